"""The one bridge between torch and the compiled kernels.

* finds the compiled extension ``hotops._C`` and says clearly when it is missing;
* validates inputs with messages that say what was wrong and what was expected;
* picks a backend per device, and when none accepts an input, lists why each one refused.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import math
import numbers
import os
import re
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch

try:
    from hotops import _C  # noqa: F401  (compiled extension)

    _C_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _C_ERROR = str(exc)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _torch_openmp_parallel() -> int:
    """Address of GOMP_parallel in the OpenMP runtime already loaded with torch, or 0.

    The kernels then run on torch's own OpenMP team. With a second pool of threads, torch's
    OpenMP workers (which spin for milliseconds after every torch op, waiting for the next one)
    share the cores with ours and slow a kernel that follows a torch op by up to 2x on 2 cores.
    libgomp, Intel's libiomp5 and LLVM's libomp all export GOMP_parallel. HOTOPS_POOL=own keeps
    hotops' own pool; so does a platform without /proc/self/maps.
    """
    pool = os.environ.get("HOTOPS_POOL", "openmp") or "openmp"
    if pool not in ("openmp", "own"):
        warnings.warn(f"HOTOPS_POOL={pool!r} is neither 'openmp' nor 'own'; using 'openmp'", stacklevel=2)
    if pool == "own":
        return 0
    try:
        with open("/proc/self/maps") as f:
            found = re.findall(r"(/\S*/lib(?:gomp|iomp5|omp)\b[^/\s]*\.so[^/\s]*)", f.read())
    except OSError:
        return 0
    for path in dict.fromkeys(found):
        try:  # RTLD_NOLOAD: the runtime already in the process, never a second copy
            fn = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL).GOMP_parallel
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value or 0
    return 0


if _C is not None:
    _C.set_openmp_parallel(_torch_openmp_parallel())


def ext():
    """The compiled extension, or a clear error if this install lacks it."""
    if _C is None:
        raise ImportError(
            "hotops._C (the compiled C++ kernels) could not be imported: "
            f"{_C_ERROR}. Reinstall hotops with `pip install .` from a source checkout."
        )
    return _C


def num_threads() -> int:
    """Threads the C++ kernels use: the same number torch's own pool uses."""
    return torch.get_num_threads()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def torch_gemm_is_fast(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMM runs `dtype` natively. torch sends bf16 and fp16 products to
    oneDNN only where the CPU can run them (AVX-512 or AMX for bf16; AVX512-FP16 or AMX-FP16 for
    fp16) and elsewhere to a generic loop: 1 GFLOP/s in bf16 against 178 in float32 on an
    AVX2-only EPYC (Zen 3). Where this is False, hotops runs its own GEMMs in float32 (InfoNCE's
    panels, the codebook's dequantized tiles)."""
    check = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }.get(dtype)
    if check is None:  # float64 and the like: torch's own GEMMs
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError, TypeError):  # a torch without the query: as before
        return True


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which hotops runs a torch GEMM on `dtype` tensors: float32 on a CPU where
    torch's GEMM has no fast path for `dtype` (`torch_gemm_is_fast`), else `dtype` itself."""
    if device.type == "cpu" and not torch_gemm_is_fast(dtype):
        return torch.float32
    return dtype


# ---------------------------------------------------------------- validation


def check_tensor(
    t, name: str, *, ndim: Optional[int | Sequence[int]] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")
    return t


def check_number(
    x,
    name: str,
    *,
    integer: bool = False,
    low: Optional[float] = None,
    low_open: bool = False,
    high: Optional[float] = None,
    high_open: bool = False,
    finite: bool = True,
):
    """A scalar argument as a Python int or float. Numbers arrive as Python numbers, NumPy scalars
    or 0-d tensors (all accepted); anything else (a string, a bool, a list, a tensor with elements
    other than one) is a TypeError naming the argument. The range check says what was expected:
    ``low``/``high`` bound the value, ``*_open`` makes a bound exclusive, ``finite`` refuses NaN
    and +-inf, ``integer`` refuses fractions (1.0 is accepted as 1)."""
    if isinstance(x, (int, float)):  # first: torch.compile(dynamic=True) traces these symbolically
        pass
    elif isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dim() != 0:
            raise TypeError(
                f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(x.shape)}"
            )
        x = x.item()
    elif hasattr(x, "item") and hasattr(x, "dtype") and getattr(x, "shape", None) == ():
        x = x.item()  # NumPy scalar or 0-d array
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
    if integer:
        if isinstance(x, float):
            if not abs(x) < math.inf or x != int(x):  # (math.isfinite cannot take a traced float)
                raise ValueError(f"{name} must be an integer, got {x!r}")
        x = int(x)
    else:
        x = float(x)
        if finite and not abs(x) < math.inf:
            raise ValueError(f"{name} must be finite, got {x!r}")
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high or (not integer and x != x):  # x != x: NaN
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be {' and '.join(b for b in (lo, hi) if b)}, got {x!r}")
    return x


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    return next(iter(present.values())).device


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{k} {str(v.dtype).replace('torch.', '')}" for k, v in present.items())
        raise TypeError(f"all inputs must share one dtype, got {what}")
    return next(iter(present.values())).dtype


def autocast_input(x):
    """x as torch's own linear, convolution and attention take it inside ``torch.autocast``: in
    autocast's dtype for x's device when autocast is on there (float64, and anything not a
    float32 / float16 / bfloat16 tensor, and tensors on devices autocast does not know, such as
    meta, unchanged). Modules call it on every forward: with no autocast anywhere it costs a
    fraction of a microsecond."""
    if not isinstance(x, torch.Tensor) or not torch._C._is_any_autocast_enabled():
        return x
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return x
    dtype = torch.get_autocast_dtype(kind)
    eligible = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return x.to(dtype) if eligible and x.dtype != dtype else x


# ---------------------------------------------------------------- backends


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to run an op: a name, a test that says whether it takes these inputs (returning
    None if so, or the reason why not), and the implementation."""

    name: str
    refuses: Callable[[torch.device], Optional[str]]
    run: Callable


def cpu_refuses(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"needs CPU tensors, got {device.type}"
    if _C is None:
        return f"the compiled extension is missing ({_C_ERROR})"
    return None


def triton_refuses(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"needs CUDA tensors, got {device.type}"
    if not triton_available():
        return "triton is not installed"
    return None


def choose(op: str, backends: Iterable[Backend], device: torch.device) -> Backend:
    reasons = []
    for b in backends:
        why = b.refuses(device)
        if why is None:
            return b
        reasons.append(f"  {b.name}: {why}")
    raise RuntimeError(f"no hotops backend can run {op} on {device}:\n" + "\n".join(reasons))


def cpu_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor the C++ kernels may read: detached from autograd (DLPack refuses tensors that
    require grad) and with a contiguous last dimension."""
    t = t.detach()
    if t.dim() > 0 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def can_skip_dispatcher(*tensors: Optional[torch.Tensor]) -> bool:
    """Plain tensors (nn.Parameters too), no tracer, nothing to differentiate: the ops'
    implementations may be called directly. The dispatcher and autograd wrapping of a custom op
    cost tens of microseconds per call, as much as a small layer's whole work."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if not all(_plain_tensor_type(type(t)) for t in present):
        return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in present)


@functools.lru_cache(maxsize=None)
def _plain_tensor_type(cls: type) -> bool:
    """torch.Tensor, or a subclass that overrides neither __torch_function__ nor __torch_dispatch__
    (nn.Parameter and its subclasses, such as the sparse modules' tracked parameters): calls on it
    are plain tensor calls. Other subclasses (fake and functional tensors, user subclasses) must
    see the op."""
    return cls is torch.Tensor or (
        issubclass(cls, torch.Tensor)
        and cls.__torch_function__ is torch._C._disabled_torch_function_impl
        and cls.__torch_dispatch__ is torch.Tensor.__torch_dispatch__
    )
