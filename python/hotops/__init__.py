"""hotops: compiled kernels for five hot paths of representation learning and retrieval."""

from hotops import ann, nn
from hotops.attention import subsampled_attention
from hotops.codebook import codebook_matmul
from hotops.infonce import info_nce
from hotops.sparse import sparse_conv2d, sparse_linear

__version__ = "0.1.0"
__all__ = [
    "info_nce",
    "codebook_matmul",
    "sparse_linear",
    "sparse_conv2d",
    "subsampled_attention",
    "ann",
    "nn",
    "__version__",
]
