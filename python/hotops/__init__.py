"""hotops: compiled kernels for five hot paths of representation learning and retrieval."""
from hotops import _backend
from hotops.infonce import info_nce
from hotops import ann
from hotops import nn

__version__ = "0.1.0"
__all__ = ["info_nce", "ann", "nn", "__version__"]
