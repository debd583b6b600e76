"""SparseLinear / SparseConv2d modules (the dense-or-sparse model is dispatch.py)."""

from __future__ import annotations

import operator
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hotops._backend import autocast_input
from hotops.integrations.torch_prune import weight_bias_mask
from hotops.sparse.dispatch import DENSE, POLICIES, SPARSE, measure_pair, remember, sparse_pays
from hotops.sparse.format import SparseWeight, checked_structure
from hotops.sparse.functional import (
    check_activation,
    check_conv2d,
    check_linear,
    conv2d_unchecked,
    linear_unchecked,
    pair,
)
from hotops.sparse.op import prepared_conv2d, prepared_linear
from hotops.sparse.spec import activate
from hotops.sparse.tracking import _BUILD_LOCK, alias_versions, state_key, traceable, track

_get_version = operator.attrgetter("_version")


def _is_to_empty(fn) -> bool:
    """Whether an _apply fn is nn.Module.to_empty's (a model's to_empty() reaches its layers
    through _apply only). Best effort, by name: a layer's own to_empty() and to_empty() from meta
    are recognised without it (see _SparseLayer._apply)."""
    return getattr(fn, "__qualname__", "").startswith("Module.to_empty.") and getattr(
        fn, "__module__", ""
    ).startswith("torch.nn.")


class _SparseLayer(nn.Module):
    """Holds the packed weight: ``values`` (nnz,) is the trainable Parameter and the CSR
    structure lives in buffers, so the packed form is built once and survives training steps.
    ``set_mask`` repacks. The dense masked weight is materialised only for the dense path and
    cached until ``values`` changes.

    ``policy``:
      "auto"   the first call with a new input signature (shape, dtype) times both paths on that
               input and keeps the faster for the signature (``dispatch`` holds the timings);
               while torch.compile traces, a signature not yet measured follows "model";
      "model"  the fixed density limits of DENSITY_LIMIT (dispatch.sparse_pays; deterministic);
      "sparse" / "dense" force a path.
    ``backend`` says which path the last forward ran, ``layout`` which format the sparse path
    runs on ("csr" or "blocked bx1", the packer's choice: SparseWeight.from_dense)."""

    _STRUCTURE = ("rowptr", "colidx", "t_rowptr", "t_colidx", "t_perm", "b_rowptr", "b_colidx", "b_perm")

    _WATCHED = frozenset(("values", "bias") + _STRUCTURE)
    # the input dtypes a bound call takes: the convolution kernels take float32 x (bfloat16 only at
    # 1x1), SparseLinear's also bfloat16 and float16 (as autocast gives them)
    _PREPARED_DTYPES = (torch.float32,)

    def __init__(self, sw: SparseWeight, bias: Optional[Tensor], policy: str):
        super().__init__()
        if not isinstance(sw, SparseWeight):
            raise TypeError(f"sw must be a hotops.sparse.SparseWeight, got {type(sw).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        if bias is not None:
            if not isinstance(bias, Tensor):
                raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if bias.shape != (sw.out_features,) or not bias.is_floating_point():
                raise ValueError(
                    f"bias must be a floating-point tensor of shape ({sw.out_features},), got "
                    f"{str(bias.dtype).replace('torch.', '')} {tuple(bias.shape)}"
                )
        self.__dict__["_cell"] = [0, []]  # see _invalidate
        self.policy = policy
        self.backend = ""
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._load(sw)

    # ---- cache invalidation. The layer's parameters and buffers are tracked tensors reporting to
    # the layer's cell [generation, live .data aliases] (tracking.track): a .data read or write of
    # any of them, replacing one, .to() and load_state_dict bump the generation. In-place changes
    # bump version counters: a prepared call keeps plain aliases of the tensors it holds copies
    # derived from or pointers to (its "sources": values and b_perm for the blocked values;
    # values, rowptr, colidx, bias for the dense weight; values and bias for the CSR, whose
    # storage set_() may move) and compares their versions; and values and bias by identity
    # (_held). So a call checks one generation, a few versions and two identities.
    # torch.utils.swap_tensors on a parameter changes none of these: assign a new one instead.

    def _invalidate(self) -> None:
        d = self.__dict__
        if "_cell" not in d:
            d["_cell"] = [0, []]
        d["_cell"][0] += 1
        d["_prepared"] = d["_dense_cache"] = d["_packed"] = None

    def _track_all(self) -> None:
        cell = self.__dict__.setdefault("_cell", [0, []])
        for t in list(self._parameters.values()) + list(self._buffers.values()):
            track(t, cell)

    def _tensor(self, name: str) -> Optional[Tensor]:
        """values or bias: the Parameter, or a plain attribute of that name (as
        torch.nn.utils.prune sets one before each forward)."""
        t = self._parameters.get(name)
        return t if t is not None or name in self._parameters else self.__dict__.get(name)

    def __setattr__(self, name, value):
        if name in self._WATCHED:
            # tracked after registration (register_parameter tracks what it stores): accelerate's
            # init_empty_weights re-creates each registered Parameter as type(p)(p.to("meta"),
            # **p.__dict__), which a tracked one's bookkeeping in __dict__ would break
            super().__setattr__(name, value)
            if isinstance(value, Tensor) and name in self._buffers:
                track(self._buffers[name], self.__dict__.setdefault("_cell", [0, []]))
            self._invalidate()
        else:
            super().__setattr__(name, value)

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(name, track(tensor, self.__dict__.setdefault("_cell", [0, []])), persistent)
        if name in self._WATCHED:
            self._invalidate()

    def register_parameter(self, name, param):
        super().register_parameter(name, param)  # then tracked: see __setattr__
        track(self._parameters.get(name), self.__dict__.setdefault("_cell", [0, []]))
        if name in self._WATCHED:
            self._invalidate()

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(), ...: new tensors or .data swaps
        was_meta = self._buffers["rowptr"].is_meta
        out = super()._apply(fn, recurse)
        if self._buffers["rowptr"].is_meta:
            # shapes only: nothing of the structure is read, so nothing uninitialised either
            self.__dict__.pop("_empty_structure", None)
        elif was_meta or _is_to_empty(fn):
            # to_empty() (of this layer or of a model holding it): the structure holds whatever
            # memory it got, until a checkpoint's packed weight is loaded (_load). From meta
            # nothing else makes real tensors (.to() refuses); from a real device, see to_empty
            self.__dict__["_empty_structure"] = True
        self._track_all()
        self._invalidate()
        return out

    def to_empty(self, *, device, recurse=True):
        """As nn.Module.to_empty: the packed structure is then uninitialised memory, which the
        layer refuses to read until load_state_dict installs one (see _apply: a model's
        to_empty() reaches this layer through _apply alone)."""
        out = super().to_empty(device=device, recurse=recurse)
        if not self._buffers["rowptr"].is_meta:
            self.__dict__["_empty_structure"] = True
        return out

    def __getstate__(self):  # copy.deepcopy, pickle: caches and the cell are rebuilt
        fresh = {"_prepared": None, "_dense_cache": None, "_packed": None, "_cell": [0, []], "_checked": {}}
        return {**self.__dict__, **fresh}

    def __setstate__(self, state):  # parameters and buffers come back untracked: track them again
        super().__setstate__(state)
        self._track_all()
        self._invalidate()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """A checkpoint's packed weight loads whole: its CSR (values, rowptr, colidx, t_*) is
        checked and replaces this layer's, whatever its number of non-zeros; the blocked form is
        this layer's choice (kept when the layer has one, rebuilt from the loaded CSR; a
        checkpoint's own blocked form is never trusted). A checkpoint with ``values`` but no
        structure loads the values into this structure."""
        csr = ("values", "rowptr", "colidx", "t_rowptr", "t_colidx", "t_perm")
        present = [n for n in csr if prefix + n in state_dict]
        blocked_keys = [prefix + n for n in ("b_rowptr", "b_colidx", "b_perm")]
        assign = local_metadata.get("assign_to_params_buffers", False)
        if (
            present == ["values"]
            and assign
            and self._buffers["rowptr"].is_meta
            and not state_dict[prefix + "values"].is_meta
        ):
            error_msgs.append(
                f"{type(self).__name__} at {prefix!r} is on the meta device and the checkpoint holds "
                "its values but no structure (rowptr, colidx, t_*): assign=True would leave them on "
                "two devices. Load a checkpoint with the whole packed weight, or build the layer "
                "on a real device and load without assign"
            )
            return
        if len(present) > 1 or (present and present != ["values"]):
            missing = [n for n in csr if n not in present]
            if missing:
                error_msgs.append(
                    f"{type(self).__name__} checkpoint at {prefix!r} holds only part of a packed weight: "
                    f"{', '.join(missing)} missing (a packed weight loads whole)"
                )
                return
            try:
                sw = checked_structure(self.shape, self.groups, *(state_dict[prefix + n] for n in csr))
                if self.block and sw.values.is_meta:  # no values to block: placeholders of the
                    # checkpoint's or this layer's (rebuilt when real tensors are loaded)
                    b = [state_dict.get(k) for k in blocked_keys]
                    if any(t is None or not t.is_meta for t in b):
                        b = [self._buffers[n].to("meta") for n in ("b_rowptr", "b_colidx", "b_perm")]
                    csr_sw = (sw.rowptr, sw.colidx, sw.values, sw.t_rowptr, sw.t_colidx, sw.t_perm)
                    sw = SparseWeight(sw.shape, sw.groups, *csr_sw, self.block, *b)
                elif self.block:
                    sw = sw.with_block(self.block)
            except (ValueError, TypeError) as e:
                error_msgs.append(f"{type(self).__name__} at {prefix!r}: {e}")
                return
            values = self._tensor("values")
            if sw.values.is_meta and not values.is_meta and not assign:
                # torch's error for a meta tensor copied into a real one, raised before anything
                # is installed: the layer stays whole on its device (bias included)
                key = prefix + "values"
                error_msgs.append(
                    f'While copying the parameter named "{key}", whose dimensions in the model are '
                    f"{values.size()} and whose dimensions in the checkpoint are "
                    f"{state_dict[key].size()}, an exception occurred : "
                    "('Cannot copy out of meta tensor; no data!',). (The checkpoint's packed weight "
                    f"was saved from a layer on the meta device; {type(self).__name__} at {prefix!r} "
                    "is left as it was)"
                )
                return
            if values.is_meta and not assign:
                # as torch loads into meta parameters (a no-op, with its warning): the layer stays
                # on meta, in the checkpoint's shapes; assign=True installs the checkpoint's tensors
                sw = sw.to("meta")
            with torch.no_grad():  # with assign, torch replaces values after this: nothing to keep
                keep = values if values.shape == sw.values.shape and not assign else None
                self._load(sw, keep_values=keep)
            state_dict = dict(state_dict)  # the caller's copy stays as it was
            for k in blocked_keys:
                state_dict.pop(k, None)
            for n in ("b_rowptr", "b_colidx", "b_perm"):
                if getattr(sw, n) is not None:
                    state_dict[prefix + n] = getattr(sw, n)
            for n in csr[1:]:
                state_dict[prefix + n] = getattr(sw, n)
        elif not self.block:  # a blocked checkpoint's structure is rebuilt, never copied
            state_dict = {k: v for k, v in state_dict.items() if k not in blocked_keys}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._invalidate()

    def _load(self, sw: SparseWeight, keep_values: Optional[Tensor] = None) -> None:
        """Installs sw's structure (and values: copied into ``keep_values`` when given, which keeps
        that Parameter's identity for optimizers)."""
        self.shape, self.groups, self.block, self.layout = sw.shape, sw.groups, sw.block, sw.layout
        if keep_values is not None:
            keep_values.copy_(sw.values.detach())
        else:
            self.values = nn.Parameter(sw.values.detach().clone().float())
        for name in self._STRUCTURE:
            self.register_buffer(name, getattr(sw, name), persistent=True)
        self.__dict__.pop("_empty_structure", None)  # a whole structure is in place (see _apply)
        self.density = sw.density  # the structure only changes in _load
        self.dispatch = {}  # input signature -> (sparse wins, sparse s, dense s): see the class doc
        self._invalidate()

    def _state(self) -> tuple:
        """What the derived caches depend on (full keys: taken on the slow path only)."""
        b = self._buffers
        return (
            self._cell[0],
            alias_versions(self._cell[1]),
            state_key(self._tensor("values")),
            state_key(self._tensor("bias")),
            *(state_key(b.get(n)) for n in self._STRUCTURE),
        )

    def _sources(self, sparse: bool) -> Optional[list]:
        """Plain aliases (sharing the version counter) of the tensors the prepared call holds
        derived copies of; None where one keeps no version (an inference tensor): then calls
        are not bound."""
        v, bias, bufs = self._tensor("values"), self._tensor("bias"), self._buffers
        if sparse and not self.block:  # read in place, but set_() moves them; an inference
            # tensor keeps no version and cannot be set_() outside inference mode: not needed
            return [t.detach() for t in (v, bias) if t is not None and not t.is_inference()]
        if sparse:
            src = [v, bufs["b_perm"]] + ([bias] if bias is not None else [])
        else:
            src = [v, bufs["rowptr"], bufs["colidx"]] + ([bias] if bias is not None else [])
        if any(t.is_inference() for t in src):
            return None
        return [t.detach() for t in src]

    def _fast(self, x: Tensor):
        """The prepared call for x when it applies (inference, same signature, nothing changed
        since it was bound), else None."""
        prepared = self._prepared
        if (
            prepared is None
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or type(x) is not Tensor
        ):
            return None
        sig, sources, versions, aliases, held, fn = prepared
        cell = self._cell
        if sig != (x.shape, x.dtype, x.is_cpu, x.is_contiguous(), self.policy, self.activation, cell[0]):
            return None
        d = self.__dict__  # what _tensor reads, without its calls: this runs on every fast call
        params = d["_parameters"]
        v = params["values"] if "values" in params else d.get("values")
        b = params["bias"] if "bias" in params else d.get("bias")
        if held[0] is not v or held[1] is not b:  # see _held
            return None
        if sources and tuple(map(_get_version, sources)) != versions:
            return None
        if (cell[1] or aliases) and alias_versions(cell[1]) != aliases:
            return None
        return fn

    def _preparable(self, x: Tensor) -> bool:
        """Whether calls on x may be bound once (see _run): plain contiguous CPU input of a dtype
        in _PREPARED_DTYPES and float32 values, nothing to differentiate, no tracing."""
        return not (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or type(x) is not Tensor
            or not x.is_cpu
            or x.dtype not in self._PREPARED_DTYPES
            or not x.is_contiguous()
            or x.numel() == 0
            or self.values.dtype != torch.float32
        )

    @property
    def sparse_weight(self) -> SparseWeight:
        """The packed weight: ``values`` itself (the Parameter, for autograd) and plain aliases of
        the structure buffers (sharing storage and version; plain tensors cost less to read per
        call than tracked ones). Kept until the layer's generation changes (a .data write,
        replacement, .to(), load_state_dict): per-call rebuilding costs as much as a small
        layer's work."""
        if self.__dict__.get("_empty_structure"):
            raise RuntimeError(
                f"{type(self).__name__}'s packed structure (rowptr, colidx, t_*) is uninitialised: "
                "to_empty() materialised it from the meta device, where it held no values. Load a "
                "checkpoint of the layer with load_state_dict (its packed weight loads whole, "
                "whatever its number of non-zeros), or build the layer on a real device"
            )
        if torch.compiler.is_compiling():  # rebuilt on every trace, of traceable tensors
            return self._packed_weight(traceable, traceable(self._tensor("values")))
        p, gen = self._packed, self._cell[0]
        if p is None or p[0] != gen or p[1].values is not self._tensor("values"):  # see _held
            p = self.__dict__["_packed"] = (gen, self._packed_weight(Tensor.detach, self._tensor("values")))
        return p[1]

    def _packed_weight(self, plain: Callable[[Tensor], Tensor], values: Tensor) -> SparseWeight:
        """The SparseWeight of `values` and the structure buffers through ``plain``."""
        b = self._buffers
        structure = {n: (plain(b[n]) if b[n] is not None else None) for n in self._STRUCTURE}
        return SparseWeight(
            self.shape,
            self.groups,
            structure["rowptr"],
            structure["colidx"],
            values,
            structure["t_rowptr"],
            structure["t_colidx"],
            structure["t_perm"],
            self.block,
            structure["b_rowptr"],
            structure["b_colidx"],
            structure["b_perm"],
        )

    def to_dense(self) -> Tensor:
        """The masked dense weight (a new tensor, differentiable w.r.t. ``values``)."""
        return self.sparse_weight.to_dense()

    def mask(self) -> Tensor:
        return self.sparse_weight.mask()

    def set_mask(self, mask: Tensor) -> None:
        """Repack under a new mask, keeping the current values where both masks agree (the layout
        chosen anew, for blocks of the same size)."""
        self._load(
            SparseWeight.from_dense(
                self.to_dense().detach(), mask=mask, groups=self.groups, block=self.block or None
            )
        )

    def _dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if torch.is_grad_enabled() and self.values.requires_grad:
            return self.to_dense().to(dtype)
        key = (self._state(), dtype)  # taken before the copy: a change while copying shows next call
        cache = self._dense_cache
        if cache is None or cache[0] != key:
            with _BUILD_LOCK:
                w = self.to_dense().detach().to(dtype)
            cache = self.__dict__["_dense_cache"] = (key, w)  # published whole
        return cache[1]

    def _run(
        self,
        x: Tensor,
        kind: str,
        rows: int,
        validate: Callable[[], object],
        run_sparse: Callable[[], Tensor],
        run_dense: Callable[[], Tensor],
        make_sparse: Callable[[], Callable],
        make_dense: Callable[[], Callable],
    ) -> Tensor:
        """One call through the full path: the dispatch for x's signature (measured once), then
        run_sparse() or run_dense(). Where x is _preparable, the call of the chosen path is bound
        once (make_sparse() / make_dense(): fn(x) with the checks done, the arguments converted
        and the dense weight cached) and kept for the next calls with this signature, which then
        cost a signature comparison and the kernel: small pruned layers (a CIFAR MobileNetV2 at
        batch 1, 4x4 to 32x32 pixels) take tens of microseconds, as much as the full path's
        Python. The measurement then times the bound calls, what the later calls will run."""
        preparable = self._preparable(x)
        cell = self._cell
        # taken before binding: a change made meanwhile shows on the next call
        gen, aliases = cell[0], alias_versions(cell[1])
        sources = {s: self._sources(s) for s in (True, False)} if preparable else {}
        versions = {s: tuple(map(_get_version, v)) for s, v in sources.items() if v is not None}
        bound = {}

        def call(sparse: bool) -> Callable[[], Tensor]:
            if not preparable:
                return run_sparse if sparse else run_dense
            if sparse not in bound:
                bound[sparse] = make_sparse() if sparse else make_dense()
            return lambda: bound[sparse](x)

        key = (x.shape, x.dtype, x.device, self.policy)
        decided = self.dispatch.get(key)
        checked = self.__dict__.setdefault("_checked", {})  # signature -> generation validated at
        if checked.get(key) != gen and not torch.compiler.is_compiling():
            validate()  # the sparse op's argument checks, whatever the path, again after any change
            remember(checked, key, gen)
        if decided is None:
            if torch.compiler.is_compiling():  # nothing is timed or stored while tracing
                decided = (sparse_pays(kind, self.density, rows), None, None)
            else:
                if self.policy == "auto" and x.device.type == "cpu":
                    ts, td = measure_pair(call(True), call(False))
                    decided = (ts < td, ts, td)
                else:
                    decided = (sparse_pays(kind, self.density, rows), None, None)
                remember(self.dispatch, key, decided)
        sparse = decided[0] if self.policy in ("auto", "model") else self.policy == "sparse"
        backend = SPARSE if sparse else DENSE
        if self.backend is not backend:  # nn.Module.__setattr__ costs microseconds per call
            self.__dict__["backend"] = backend
        run = call(sparse)
        self.__dict__["_prepared"] = (
            None
            if sources.get(sparse) is None
            else (
                (x.shape, x.dtype, x.is_cpu, x.is_contiguous(), self.policy, self.activation, gen),
                sources[sparse],
                versions[sparse],
                aliases,
                self._held(),
                bound[sparse],
            )
        )
        return run()

    def _held(self) -> tuple:
        """values and bias as objects: torch.func.functional_call puts other tensors in
        ``_parameters`` without __setattr__, so no generation changes; the calls bound to the
        previous ones are found by identity."""
        return (self._tensor("values"), self._tensor("bias"))

    def _dense_params(self, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
        """(weight, bias) for torch's dense op on activations of ``dtype``."""
        b = traceable(self.bias)
        return self._dense_weight(dtype), (b.to(dtype) if b is not None else None)

    def _dense_activation(self, y: Tensor) -> Tensor:
        return activate(y, self.activation)

    def _dense_call(self, conv: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor], dtype: torch.dtype):
        """fn(x) = act(conv(x, w, b)) with the cached dense weight and bias bound."""
        (w, b), activation = self._dense_params(dtype), self.activation
        return lambda x: activate(conv(x, w, b), activation)


class SparseLinear(_SparseLayer):
    """A linear layer whose weight is pruned and stored sparsely; ``activation`` None, "relu" or
    "relu6" is fused into the kernel."""

    _PREPARED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(
        self,
        sw: SparseWeight,
        bias: Optional[Tensor] = None,
        activation: Optional[str] = None,
        policy: str = "auto",
    ):
        if not isinstance(sw, SparseWeight):
            raise TypeError(f"sw must be a hotops.sparse.SparseWeight, got {type(sw).__name__}")
        if len(sw.shape) != 2:
            raise ValueError(f"SparseLinear needs a (out, in) weight, got shape {sw.shape}")
        check_activation(activation)
        super().__init__(sw, bias, policy)
        self.in_features, self.out_features = sw.shape[1], sw.shape[0]
        self.activation = activation

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        sparsity: Optional[float] = None,
        mask: Optional[Tensor] = None,
        activation: Optional[str] = None,
        policy: str = "auto",
        block: Optional[int] = None,
        layout: str = "auto",
    ) -> "SparseLinear":
        """``block`` and ``layout`` as in SparseWeight.from_dense (block pruning, the format). A
        layer pruned with torch.nn.utils.prune gives its ``weight_mask`` (when neither ``sparsity``
        nor ``mask`` is given) and ``weight_orig`` values; the layer itself is left as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        weight, bias, pruned = weight_bias_mask(linear)
        mask = pruned if mask is None and sparsity is None else mask
        sw = SparseWeight.from_dense(weight, sparsity=sparsity, mask=mask, block=block, layout=layout)
        return cls(sw, bias, activation, policy)

    def forward(self, x: Tensor) -> Tensor:
        x = autocast_input(x)  # as nn.Linear takes x inside torch.autocast
        fast = self._fast(x)
        if fast is not None:
            return fast(x)
        sw, act = self.sparse_weight, check_activation(self.activation)
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
        return self._run(
            x,
            "linear",
            rows,
            validate=lambda: check_linear(x, sw, self.bias, self.activation),
            run_sparse=lambda: linear_unchecked(x, sw, traceable(self.bias), act),
            run_dense=lambda: self._dense_activation(F.linear(x, *self._dense_params(x.dtype))),
            make_sparse=lambda: prepared_linear(
                x, sw.values, sw.rowptr, sw.colidx, sw.t_rowptr, self.bias, sw.shape[1], act, sw.blocked
            ),
            make_dense=lambda: self._dense_call(F.linear, x.dtype),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.density:.3f}, layout={self.layout}, policy={self.policy}"
        )


class _Geometry:
    """A SparseConv2d's stride, padding or dilation: read as the int pair F.conv2d takes; set
    (model surgery, e.g. a stride moved to another layer), checked, and every derived call and
    dispatch choice dropped, so the sparse and the dense path both follow it."""

    def __init__(self, index: int, minimum: int):
        self.index, self.minimum = index, minimum

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, layer, owner=None):
        return self if layer is None else tuple(layer._pairs[self.index])

    def __set__(self, layer, value):
        pairs = list(layer._pairs)
        pairs[self.index] = pair(value, self.name, self.minimum)
        layer.__dict__["_pairs"] = pairs
        layer.dispatch.clear()
        layer._invalidate()


class SparseConv2d(_SparseLayer):
    """A 2-d convolution whose weight is pruned and stored sparsely (any kernel size, stride,
    padding, dilation, groups); ``activation`` None, "relu" or "relu6" is fused into the kernel.
    stride, padding and dilation may be set after construction; both paths follow them."""

    stride, padding, dilation = _Geometry(0, 1), _Geometry(1, 0), _Geometry(2, 1)

    def __init__(
        self,
        sw: SparseWeight,
        bias: Optional[Tensor] = None,
        stride=1,
        padding=0,
        dilation=1,
        activation: Optional[str] = None,
        policy: str = "auto",
    ):
        if not isinstance(sw, SparseWeight):
            raise TypeError(f"sw must be a hotops.sparse.SparseWeight, got {type(sw).__name__}")
        if len(sw.shape) != 4:
            raise ValueError(f"SparseConv2d needs an (out, in/groups, kh, kw) weight, got shape {sw.shape}")
        check_activation(activation)
        pairs = [pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)]
        super().__init__(sw, bias, policy)
        self.__dict__["_pairs"] = pairs  # read through the _Geometry attributes
        self.in_channels, self.out_channels = sw.shape[1] * sw.groups, sw.shape[0]
        self.activation = activation
        self.kind = (
            "depthwise"
            if sw.shape[1] == 1 and sw.groups > 1
            else "conv1x1"
            if sw.shape[2:] == (1, 1)
            else "conv"
        )

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        sparsity: Optional[float] = None,
        mask: Optional[Tensor] = None,
        activation: Optional[str] = None,
        policy: str = "auto",
        block: Optional[int] = None,
        layout: str = "auto",
    ) -> "SparseConv2d":
        """``block`` and ``layout`` as in SparseWeight.from_dense (block pruning, the format);
        torch.nn.utils.prune'd layers as in SparseLinear.from_dense."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                "SparseConv2d supports numeric zero padding only "
                f"(got padding={conv.padding!r}, padding_mode={conv.padding_mode!r})"
            )
        weight, bias, pruned = weight_bias_mask(conv)
        mask = pruned if mask is None and sparsity is None else mask
        sw = SparseWeight.from_dense(
            weight, sparsity=sparsity, mask=mask, groups=conv.groups, block=block, layout=layout
        )
        return cls(
            sw, bias, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), activation, policy
        )

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x = autocast_input(x)  # as nn.Conv2d takes x inside torch.autocast
        fast = self._fast(x)
        if fast is not None:
            return fast(x)
        sw, act = self.sparse_weight, check_activation(self.activation)
        geo = self._pairs
        dense = lambda x, w, b: F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)  # noqa: E731
        return self._run(
            x,
            self.kind,
            0,
            validate=lambda: check_conv2d(x, sw, self.bias, *geo, None, self.activation),
            run_sparse=lambda: conv2d_unchecked(x, sw, traceable(self.bias), *geo, act),
            run_dense=lambda: self._dense_activation(dense(x, *self._dense_params(x.dtype))),
            make_sparse=lambda: prepared_conv2d(
                x,
                sw.values,
                sw.rowptr,
                sw.colidx,
                sw.t_rowptr,
                self.bias,
                list(sw.shape),
                *geo,
                sw.groups,
                act,
                sw.blocked,
            ),
            make_dense=lambda: self._dense_call(dense, x.dtype),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.shape[2:])}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"density={self.density:.3f}, layout={self.layout}, policy={self.policy}"
        )
