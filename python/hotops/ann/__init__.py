"""Approximate nearest-neighbour search with product quantization (BiDR's bi-granular retrieval).

PQIndex / IVFPQIndex: k-means codebooks, 8-bit (or fewer-bit) codes, ADC scan with a fused top-k,
optional exact refine; BiGranularIndex: PQ candidates in memory, exact re-rank from a memory-mapped
store of dense vectors. Every method takes NumPy arrays or torch tensors and answers in kind."""
from hotops.ann.bigran import BiGranularIndex, open_store, write_store
from hotops.ann.index import IVFPQIndex, PQIndex
from hotops.ann.kmeans import kmeans
from hotops.ann.op import quantize_ste
from hotops.ann.sharded import ShardedIndex, build_sharded  # noqa: F401 (collective: torch.distributed)

__all__ = ["PQIndex", "IVFPQIndex", "BiGranularIndex", "write_store", "open_store", "kmeans", "quantize_ste"]
