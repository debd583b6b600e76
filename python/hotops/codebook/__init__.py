"""Codebook-quantized linear layers (JLCM: jointly learnable codebooks and mappings)."""

from hotops.codebook.format import CodebookWeight
from hotops.codebook.functional import ACTIVATION_DTYPES, codebook_matmul, convert_aqlm, from_aqlm
from hotops.codebook.jlcm import Format, compress, load_compressed
from hotops.codebook.module import CodebookLinear, WideCodebookLinear

__all__ = [
    "ACTIVATION_DTYPES",
    "codebook_matmul",
    "CodebookWeight",
    "CodebookLinear",
    "WideCodebookLinear",
    "compress",
    "Format",
    "load_compressed",
    "from_aqlm",
    "convert_aqlm",
]
