"""Input conversion shared by the indexes: NumPy arrays and torch tensors in, validated
C-contiguous NumPy arrays out, and results handed back in the caller's kind."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from hotops import _backend


def is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


INT64_MAX = (1 << 63) - 1
MAX_ABS = 1e15  # larger coordinates overflow float32 squared distances (1e30 * dim < 3.4e38)


def as_numpy(x, name: str) -> np.ndarray:
    """A NumPy array (no copy where possible) of a NumPy array or a torch tensor on any device;
    bfloat16 tensors (which NumPy lacks) become float32."""
    if is_torch(x):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().resolve_conj().resolve_neg().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a NumPy array or a torch tensor, got {type(x).__name__}")


def float_rows(a: np.ndarray, name: str, dim: int) -> np.ndarray:
    """a itself, once it is a 2-d (n, dim) floating-point array (not converted, nor checked for
    finiteness: a memory-mapped source is read chunk by chunk)."""
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(
            f"{name} has dtype {a.dtype}; expected float32 (float64, float16 and bfloat16 are converted)"
        )
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (n, {dim}) array, got shape {a.shape}")
    if a.shape[1] != dim:
        raise ValueError(f"{name} has dimension {a.shape[1]}, the index has dimension {dim}")
    return a


def as_vectors(x, name: str, dim: int) -> np.ndarray:
    """(n, dim) float32, C-contiguous and finite. float64/float16 are converted; integer and bool
    arrays are refused (they are almost always ids or codes passed by mistake)."""
    a = np.ascontiguousarray(float_rows(as_numpy(x, name), name, dim), dtype=np.float32)
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} contains NaN or Inf (first at row {bad[0]}, column {bad[1]})")
    if a.size and np.abs(a).max() > MAX_ABS:
        bad = np.argwhere(np.abs(a) > MAX_ABS)[0]
        raise ValueError(
            f"{name} has a value of magnitude {float(np.abs(a[bad[0], bad[1]])):.3g} (row {bad[0]}, "
            f"column {bad[1]}); at most {MAX_ABS:.0e} is accepted, since squared distances "
            f"would overflow float32 to inf"
        )
    return a


def as_device_vectors(x: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    """as_vectors for a tensor that stays on its device (the GPU path): (n, dim) float32,
    contiguous and finite."""
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; expected float32 (float64 and float16 are converted)")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d (n, {dim}) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, the index has dimension {dim}")
    x = x.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if x.numel() and float(x.abs().max()) > MAX_ABS:
        raise ValueError(
            f"{name} has values of magnitude above {MAX_ABS:.0e}; squared distances would "
            f"overflow float32 to inf"
        )
    return x


def _id_array(v, name: str) -> np.ndarray:
    """Ids or a mask as NumPy: an array, a tensor, or a Python list / tuple (as remove_ids and
    reconstruct take them; an empty one is no ids)."""
    if isinstance(v, (list, tuple)):
        return np.asarray(v) if len(v) else np.empty(0, np.int64)
    return as_numpy(v, name)


def as_ids(ids, n: int) -> np.ndarray:
    """(n,) int64 ids in 0 .. 2**63 - 1: -1 is the "no result" padding of search output, and
    uint64 values past 2**63 - 1 would wrap to negative int64."""
    a = _id_array(ids, "ids")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"ids have dtype {a.dtype}; expected integers (int64)")
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"ids have shape {a.shape}; expected ({n},), one per added vector")
    if a.size and a.dtype.kind == "u" and int(a.max()) > INT64_MAX:
        at = int(np.argmax(a > INT64_MAX))
        raise ValueError(
            f"ids must be at most 2**63 - 1 (they are stored as int64); got {int(a[at])} at position {at}"
        )
    if a.size and a.dtype.kind == "i" and int(a.min()) < 0:
        at = int(np.argmax(a < 0))
        raise ValueError(
            f"ids must be non-negative (-1 marks a missing result in search output); "
            f"got {int(a[at])} at position {at}"
        )
    return np.ascontiguousarray(a, dtype=np.int64)


def auto_ids(largest: int, n: int) -> np.ndarray:
    """n ids following `largest` (-1 for an empty index), or a ValueError if they pass 2**63 - 1."""
    start = largest + 1
    if n and start + n - 1 > INT64_MAX:
        raise ValueError(
            f"automatic ids would pass 2**63 - 1 (the largest id held is {largest}); pass ids= explicitly"
        )
    return np.arange(start, start + n, dtype=np.int64)


def check_k(k, name: str = "k") -> int:
    return _backend.check_number(k, name, integer=True, low=1)


def results(
    score: np.ndarray, rows: np.ndarray, ids: np.ndarray, metric: str, torch_out: bool
) -> Tuple[object, object]:
    """Kernel scores (lower is better) and row numbers -> (distances, ids) as the user expects:
    squared L2 distances, or inner products for ip; -1 ids where fewer than k were found."""
    dist = -score if metric == "ip" else score
    out_ids = np.where(rows >= 0, ids[np.maximum(rows, 0)] if len(ids) else -1, -1)
    if torch_out:
        return torch.from_numpy(dist), torch.from_numpy(out_ids)
    return dist, out_ids


def threads() -> int:
    return _backend.num_threads()


def allow_rows(allow, ids: np.ndarray) -> Optional[np.ndarray]:
    """An allow-list (array of ids, or a boolean mask indexed by id) as a per-row uint8 mask the
    scan kernels test before scoring a row."""
    if allow is None:
        return None
    a = _id_array(allow, "allow")
    if a.ndim != 1:
        raise ValueError(f"allow must be 1-d (ids or a boolean mask over ids), got shape {a.shape}")
    if a.dtype == np.bool_:
        inside = (ids >= 0) & (ids < a.shape[0])
        rows = np.zeros(ids.shape[0], dtype=np.uint8)
        rows[inside] = a[ids[inside]]
        return rows
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"allow has dtype {a.dtype}; expected int64 ids or a bool mask")
    if a.dtype.kind == "u":  # ids above 2**63 - 1 cannot be held; compare as int64, not float64
        a = a[a <= INT64_MAX]
    return np.isin(ids, a.astype(np.int64, copy=False)).astype(np.uint8)
