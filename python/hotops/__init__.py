"""hotops: compiled kernels for five hot paths of representation learning and retrieval."""
from hotops import _backend
from hotops.infonce import info_nce
from hotops.codebook import codebook_matmul
from hotops import nn

__version__ = "0.1.0"
__all__ = ["info_nce", "codebook_matmul", "nn", "__version__"]
