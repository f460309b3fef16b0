"""Device-independent performance evidence: FLOP/byte/launch counts, saved-activation bytes, roofline.

This implements section 1 of ``docs/performance.md`` (evidence producible on a CPU-only machine):

* :func:`count` runs a function on the **meta** device (no data, no compute) under a
  ``TorchDispatchMode`` and records every aten op that reaches the dispatcher: its FLOPs, the HBM bytes
  of its tensor inputs and outputs, and one kernel launch. Forward and backward are counted as separate
  phases. Our own ``torch.library`` custom ops are opaque; each declares its launches through
  :func:`register_cost`.
* :func:`saved_bytes` counts the bytes autograd keeps alive for backward after one forward
  (``torch.autograd.graph.saved_tensors_hooks``), unique storages only, parameters and buffers excluded.
* :func:`roofline` turns counts into a **modeled** H100 time,
  ``t = max(FLOPs / P, bytes / BW) + launch`` per launch. It is a model, and is labelled as one.

Counting conventions (what one number means):

* FLOPs: a multiply-add is 2 FLOPs. ``mm (M,K)@(K,N)``: ``2*M*K*N``; ``addmm``: the same (the bias add
  is folded into the GEMM epilogue and not counted, as in ``torch.utils.flop_counter``); ``bmm``:
  ``2*B*M*K*N``. Convolutions (incl. backward) and scaled-dot-product attention use the formulas of
  ``torch.utils.flop_counter``. Pointwise ops: ``numel(output)``. Reductions: ``numel(largest input)``.
  Any other op (copies, cat, index, norms, softmax, ...): ``numel(largest output)``.
* Bytes: for every distinct tensor input and every tensor output, the bytes it addresses, where a
  broadcast (stride-0) dimension is counted once: ``prod(size[d] for d with stride[d] != 0) * itemsize``.
  In-place ops count the mutated tensor as read and written. Gathers (``index_select``, ``embedding``)
  are charged their whole source tensor, an over-estimate.
* Launches: 1 per counted op. Views and metadata ops (``view``, ``t``, ``transpose``, ``expand``,
  ``permute``, ``detach``, ``alias``, ``as_strided``, ``slice``, ``select``, ``_unsafe_view``, ...) and
  allocations (``empty*``) cost 0 FLOPs, 0 bytes, 0 launches and are not listed.

Composite ops (``linear``, ``matmul``) never reach the mode: PyTorch decomposes them first into
``addmm``/``mm``/``bmm`` plus views, which is what runs on a GPU too.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

from pyfastpeft.core import cost as _cost
from pyfastpeft.core.cost import Launch
from pyfastpeft.core.table import table

__all__ = [
    "Launch",
    "Counts",
    "count",
    "register_cost",
    "unregister_cost",
    "tensor_bytes",
    "SavedTensor",
    "SavedBytes",
    "saved_bytes",
    "DEVICES",
    "Roofline",
    "roofline",
    "launch_time",
]

PHASES = ("fwd", "bwd")
_MODES = {"fwd": ("fwd",), "bwd": ("bwd",), "fwd+bwd": ("fwd", "bwd")}
_HALF = (torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------




def tensor_bytes(t: Any) -> int:
    """HBM bytes addressed by a tensor, counting broadcast (stride-0) dimensions once.

    Args:
        t: a tensor (any device, including meta); anything else gives 0.

    Returns:
        ``prod(size[d] for d if stride[d] != 0) * element_size`` in bytes; 0 for empty tensors.
    """
    if not isinstance(t, torch.Tensor):
        return 0
    if t.numel() == 0:
        return 0
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    n = 1
    for s, st in zip(t.shape, t.stride()):
        if st != 0:
            n *= s
    return n * t.element_size()


def _fmt_num(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _dtype_str(d: Optional[torch.dtype]) -> str:
    return str(d).replace("torch.", "") if d is not None else "-"


@dataclass
class Counts:
    """FLOPs, bytes and launches recorded by :func:`count`.

    Attributes:
        ops: one :class:`Launch` per counted kernel launch, in execution order.

    Totals are properties (``flops``, ``bytes``, ``launches``) and per phase via :meth:`phase` /
    :meth:`totals`. ``a + b`` concatenates the launch lists (e.g. several layers). ``str(counts)``
    is a table grouped by (phase, op, dtype).
    """

    ops: List[Launch] = field(default_factory=list)

    @property
    def flops(self) -> int:
        """Total FLOPs over all phases."""
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> int:
        """Total HBM bytes (read + written) over all phases."""
        return sum(o.bytes for o in self.ops)

    @property
    def launches(self) -> int:
        """Total number of kernel launches over all phases."""
        return len(self.ops)

    def phase(self, phase: str) -> "Counts":
        """The launches of one phase (``"fwd"`` or ``"bwd"``) as a new :class:`Counts`."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return Counts([o for o in self.ops if o.phase == phase])

    @property
    def fwd(self) -> "Counts":
        """Forward launches."""
        return self.phase("fwd")

    @property
    def bwd(self) -> "Counts":
        """Backward launches."""
        return self.phase("bwd")

    def totals(self) -> Dict[str, Dict[str, int]]:
        """Per-phase and overall totals: ``{"fwd"|"bwd"|"total": {"flops", "bytes", "launches"}}``."""
        out = {}
        for p in PHASES:
            c = self.phase(p)
            out[p] = dict(flops=c.flops, bytes=c.bytes, launches=c.launches)
        out["total"] = dict(flops=self.flops, bytes=self.bytes, launches=self.launches)
        return out

    def by_op(self) -> "OrderedDict[Tuple[str, str, str], Dict[str, int]]":
        """Aggregate by (phase, name, dtype): ``{"calls", "flops", "bytes"}``, first-seen order."""
        agg: "OrderedDict[Tuple[str, str, str], Dict[str, int]]" = OrderedDict()
        for o in self.ops:
            key = (o.phase, o.name, _dtype_str(o.dtype))
            d = agg.setdefault(key, dict(calls=0, flops=0, bytes=0))
            d["calls"] += 1
            d["flops"] += o.flops
            d["bytes"] += o.bytes
        return agg

    def __add__(self, other: "Counts") -> "Counts":
        if not isinstance(other, Counts):
            return NotImplemented
        return Counts(list(self.ops) + list(other.ops))

    def __radd__(self, other: Any) -> "Counts":
        # lets sum([c1, c2, ...]) work (sum starts from 0)
        if other == 0:
            return Counts(list(self.ops))
        return NotImplemented

    def __str__(self) -> str:
        rows = [("phase", "op", "dtype", "calls", "FLOPs", "bytes")]
        for (p, name, dt), d in self.by_op().items():
            rows.append((p, name, dt, str(d["calls"]), _fmt_num(d["flops"]), _fmt_num(d["bytes"], "B")))
        for p, d in self.totals().items():
            if p != "total" and d["launches"] == 0:
                continue
            rows.append((p, "TOTAL", "", str(d["launches"]), _fmt_num(d["flops"]), _fmt_num(d["bytes"], "B")))
        return ("Counts (FLOPs, HBM bytes, launches; counted on the meta device)\n"
                + table(rows[0], rows[1:], align="<<<>>>"))

    def __repr__(self) -> str:
        t = self.totals()
        return (f"Counts(fwd={t['fwd']}, bwd={t['bwd']}, total={t['total']})")


# --------------------------------------------------------------------------------------------------
# Cost registry for custom (opaque) ops
# --------------------------------------------------------------------------------------------------

CostFn = Callable[[tuple, dict, Any], List[Launch]]
_COSTS: Dict[str, CostFn] = {}

# Namespaces of ops that are counted generically (everything else is an opaque custom op).
_ATEN_NAMESPACES = ("aten", "prims")
# Namespaces whose ops do no device work (profiler markers).
_FREE_NAMESPACES = ("profiler",)


def _normalize_qualname(qualname: str) -> str:
    q = qualname.strip()
    if q.startswith("torch.ops."):
        q = q[len("torch.ops."):]
        ns, _, rest = q.partition(".")
        q = f"{ns}::{rest}"
    if "::" not in q:
        raise ValueError(f"qualname must look like 'namespace::op' or 'namespace::op.overload', got {qualname!r}")
    if q.endswith(".default"):
        q = q[: -len(".default")]
    return q


def register_cost(qualname: str, fn: Optional[CostFn] = None):
    """Declare the launches of an opaque custom op, for :func:`count`.

    Args:
        qualname: ``"namespace::op"`` (all overloads) or ``"namespace::op.overload"``, e.g.
            ``"pyfastpeft::lora_linear_fwd"``. ``.default`` is the same as no overload.
        fn: ``fn(args, kwargs, outputs) -> list[Launch]``, called with the op's (meta) arguments and
            its outputs after the fake implementation ran. ``Launch.phase`` is overwritten by the
            phase the op ran in. If omitted, ``register_cost`` returns a decorator.

    Returns:
        ``fn`` (so it can be used as a decorator).

    Example:
        >>> @register_cost("mylib::scale")                                 # doctest: +SKIP
        ... def _(args, kwargs, out):
        ...     x = args[0]
        ...     return [Launch("mylib.scale", x.numel(), 2 * tensor_bytes(x), x.dtype)]
    """
    key = _normalize_qualname(qualname)

    def deco(f: CostFn) -> CostFn:
        if not callable(f):
            raise TypeError(f"cost function for {qualname!r} must be callable")
        _COSTS[key] = f
        return f

    return deco if fn is None else deco(fn)


def unregister_cost(qualname: str) -> None:
    """Remove a cost formula registered with :func:`register_cost` (no error if absent)."""
    _COSTS.pop(_normalize_qualname(qualname), None)


def _lookup_cost(func) -> Optional[CostFn]:
    name = func._schema.name  # "ns::op"
    overload = func._overloadname
    if overload and overload != "default":
        f = _COSTS.get(f"{name}.{overload}")
        if f is not None:
            return f
    return _COSTS.get(name)


# --------------------------------------------------------------------------------------------------
# Per-op FLOP formulas
# --------------------------------------------------------------------------------------------------


def _mm(a, b, *_, **__):
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _addmm(_self, a, b, *_, **__):
    return _mm(a, b)


def _bmm(a, b, *_, **__):
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _baddbmm(_self, a, b, *_, **__):
    return _bmm(a, b)


def _addbmm(_self, a, b, *_, **__):
    return _bmm(a, b)


def _mv(a, v, *_, **__):
    return 2 * a.shape[0] * a.shape[1]


def _addmv(_self, a, v, *_, **__):
    return _mv(a, v)


def _dot(a, b, *_, **__):
    return 2 * a.numel()


def _scaled_mm(a, b, *_, **__):
    return _mm(a, b)


_MATMUL_FLOPS: Dict[str, Callable[..., int]] = {
    "mm": _mm,
    "addmm": _addmm,
    "_addmm_activation": _addmm,
    "bmm": _bmm,
    "baddbmm": _baddbmm,
    "addbmm": _addbmm,
    "mv": _mv,
    "addmv": _addmv,
    "dot": _dot,
    "vdot": _dot,
    "_scaled_mm": _scaled_mm,
    "_int_mm": _mm,
}

# Ops that allocate or only touch metadata: no launch. (Alias-returning ops are found from the schema.)
_FREE_OPS = {
    "_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "empty_permuted", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "size", "stride", "dim", "is_contiguous", "is_same_size",
    "_reshape_alias", "resize_", "set_", "_has_compatible_shallow_copy_type", "record_stream",
    "_local_scalar_dense",
}
_REDUCTION_NAMES = {
    "sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "std_mean", "norm",
    "linalg_vector_norm", "logsumexp", "argmax", "argmin", "any", "all", "count_nonzero", "nansum",
    "aminmax", "cumsum", "cumprod", "logcumsumexp",
}


_REDUCTION_TAG = getattr(torch.Tag, "reduction", None)


def _is_view_op(func) -> bool:
    if getattr(func, "is_view", False):
        return True
    rets = func._schema.returns
    if not rets:
        return False
    # every returned tensor aliases an input and none is written: a view (e.g. split, unbind, chunk)
    for r in rets:
        ai = r.alias_info
        if ai is None or ai.is_write:
            return False
    return True


def _torch_flop_registry() -> dict:
    try:
        from torch.utils.flop_counter import flop_registry
    except Exception:  # pragma: no cover - very old torch
        return {}
    return flop_registry


def _tensors(tree) -> List[torch.Tensor]:
    flat, _ = tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _distinct(ts: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Drop repeated arguments (``mul(x, x)`` reads ``x`` once)."""
    seen, out = set(), []
    for t in ts:
        try:
            key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        except Exception:
            key = ("id", id(t))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _first_float_dtype(ts: Sequence[torch.Tensor]) -> Optional[torch.dtype]:
    for t in ts:
        if t.is_floating_point() or t.is_complex():
            return t.dtype
    return ts[0].dtype if ts else None


def _generic_launch(func, args, kwargs, out) -> Optional[Launch]:
    """Cost of one aten op, or None for views/metadata/allocations."""
    base = func._schema.name.split("::", 1)[-1]
    if base in _FREE_OPS or _is_view_op(func):
        return None
    # an ``out=`` tensor is written, not read: it is counted once, with the outputs
    ins = _distinct(_tensors((args, {k: v for k, v in kwargs.items() if k != "out"})))
    outs = _tensors(out)
    nbytes = sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in _distinct(outs))
    name = f"aten.{base}" if func.namespace == "aten" else f"{func.namespace}.{base}"
    dtype = _first_float_dtype(ins) or _first_float_dtype(outs)
    kind, tc = "other", False
    packet = func._overloadpacket
    reg = _torch_flop_registry()
    mm_base = base[:-1] if base.endswith("_") and base[:-1] in _MATMUL_FLOPS else base  # addmm_ is addmm in place
    if mm_base in _MATMUL_FLOPS:
        flops = int(_MATMUL_FLOPS[mm_base](*args, **kwargs))
        kind, tc = "matmul", True
    elif packet in reg:
        flops = int(reg[packet](*args, **kwargs, out_val=out))
        kind = "conv" if "conv" in base else ("attention" if "attention" in base else "matmul")
        tc = True
    elif torch.Tag.pointwise in func.tags:
        flops = max((t.numel() for t in outs), default=0)
        kind = "pointwise"
    elif (_REDUCTION_TAG is not None and _REDUCTION_TAG in func.tags) or base in _REDUCTION_NAMES:
        flops = max((t.numel() for t in ins), default=0)
        kind = "reduction"
    else:
        flops = max((t.numel() for t in outs), default=0)
    return Launch(name=name, flops=flops, bytes=nbytes, dtype=dtype, tensor_core=tc, kind=kind)


# --------------------------------------------------------------------------------------------------
# The dispatch mode
# --------------------------------------------------------------------------------------------------


class _CountingMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.phase = "fwd"
        self.ops: List[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns = func.namespace
        if ns in _FREE_NAMESPACES:
            return out
        if ns in _ATEN_NAMESPACES:
            launch = _generic_launch(func, args, kwargs, out)
            if launch is not None:
                self.ops.append(dataclasses.replace(launch, phase=self.phase))
            return out
        cost = _lookup_cost(func)
        if cost is None:
            raise NotImplementedError(
                f"pyfastpeft.tools.perf.count: custom op '{func._schema.name}' (overload "
                f"'{func._overloadname}') has no cost formula. Declare its launches with "
                f"pyfastpeft.tools.perf.register_cost('{func._schema.name}', fn)."
            )
        launches = cost(args, kwargs, out)
        for ln in launches:
            if not isinstance(ln, Launch):
                raise TypeError(f"cost formula of '{func._schema.name}' must return a list of Launch, got {type(ln)}")
            self.ops.append(dataclasses.replace(ln, phase=self.phase))
        return out


def _to_device_keep_layout(t: torch.Tensor, device, bases: dict) -> torch.Tensor:
    """``t`` on ``device`` with the same sizes, strides, offset and storage sharing (``Tensor.to``
    would densify a broadcast view, changing the bytes it addresses)."""
    if t.layout != torch.strided:
        return t.to(device)
    try:
        st = t.untyped_storage()
        key = (str(t.device), st._cdata)
        base = bases.get(key)
        if base is None:
            base = torch.empty(st.nbytes(), dtype=torch.uint8, device=device)
            bases[key] = base
        return base.view(t.dtype).as_strided(t.size(), t.stride(), t.storage_offset())
    except Exception:  # odd storages (e.g. nbytes not a multiple of the itemsize): same strides, own storage
        return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)


def _leaf_like(t: torch.Tensor, device: Optional[Union[str, torch.device]], bases: dict) -> torch.Tensor:
    """A fresh leaf on ``device`` (or sharing storage if None) with the same layout and requires_grad."""
    with torch.no_grad():
        if device is None:
            new = t.detach()
        else:
            new = _to_device_keep_layout(t.detach(), device, bases).detach()
    if t.requires_grad and (new.is_floating_point() or new.is_complex()):
        new.requires_grad_(True)
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    return new


def _convert(tree, device, bases: dict):
    return tree_map(lambda a: _leaf_like(a, device, bases) if isinstance(a, torch.Tensor) else a, tree)


def _grad_outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        flat = [out]
    elif isinstance(out, dict):
        flat = _tensors(list(out.values()))
    else:
        flat = _tensors(out)
    return [t for t in flat if t.requires_grad and t.grad_fn is not None]


def count(fn: Callable, *args, mode: Optional[str] = None, backward: bool = False,
          device: Optional[Union[str, torch.device]] = "meta", **kwargs) -> Counts:
    """Count FLOPs, HBM bytes and launches of ``fn(*args, **kwargs)``, per phase.

    Every tensor in ``args``/``kwargs`` (nested in lists/tuples/dicts too) is replaced by a fresh leaf
    on ``device`` with the same shape, dtype, strides, storage offset, storage sharing and
    ``requires_grad``; if ``fn`` is an
    ``nn.Module``, its parameters and buffers are replaced the same way (``torch.func.functional_call``),
    so ``fn`` itself is never modified and no real memory is allocated on the meta device. Parameters
    with ``requires_grad=False`` (frozen weights) get no gradient, exactly as in training.

    For backward, the outputs that require grad get a random upstream gradient of their shape
    (``torch.randn_like``; data-less on meta) and ``torch.autograd.backward`` runs; its ops are recorded
    with ``phase="bwd"``.

    Args:
        fn: a callable or an ``nn.Module``. A closure that captures real-device tensors (e.g. a module
            not passed as ``fn``) will mix devices on meta: pass the module as ``fn``, or use
            ``device=None``.
        *args: positional arguments of ``fn``.
        mode: ``"fwd"`` (default), ``"bwd"`` (forward runs but only backward is kept) or ``"fwd+bwd"``.
        backward: shorthand for ``mode="fwd+bwd"`` when ``mode`` is not given.
        device: where to run: ``"meta"`` (default); ``None`` runs on the arguments' own devices (needed
            when ``fn`` has data-dependent shapes, e.g. ``nonzero``; small shapes only).
        **kwargs: keyword arguments of ``fn``. (``mode``, ``backward`` and ``device`` are reserved; wrap
            ``fn`` with ``functools.partial`` to pass arguments with those names.)

    Returns:
        :class:`Counts` with one :class:`Launch` per recorded kernel launch.

    Raises:
        NotImplementedError: an op outside ``aten``/``prims`` (a custom op) has no :func:`register_cost`
            formula; the message names it.
        ValueError: bad ``mode``, or backward requested but no output requires grad.
    """
    if mode is None:
        mode = "fwd+bwd" if backward else "fwd"
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    keep = _MODES[mode]
    run_bwd = "bwd" in keep

    bases: dict = {}  # original storage -> its copy on `device`: aliasing between inputs is kept
    args, kwargs = _convert((args, kwargs), device, bases)
    call = fn
    if isinstance(fn, nn.Module):
        params = {n: _leaf_like(p, device, bases) for n, p in fn.named_parameters()}
        buffers = {n: _leaf_like(b, device, bases) for n, b in fn.named_buffers()}
        state = {**params, **buffers}

        def call(*a, **k):
            return torch.func.functional_call(fn, state, a, k)

    counter = _CountingMode()
    counter.phase = "fwd"
    with torch.enable_grad():
        with counter:
            out = call(*args, **kwargs)
        if run_bwd:
            outs = _grad_outputs(out)
            if not outs:
                raise ValueError("count(..., mode includes 'bwd'): no output of fn requires grad")
            grads = [torch.randn_like(t) for t in outs]  # outside the mode: not a counted launch
            counter.phase = "bwd"
            with counter:
                torch.autograd.backward(outs, grads)
    return Counts([o for o in counter.ops if o.phase in keep])


# --------------------------------------------------------------------------------------------------
# Saved-for-backward bytes
# --------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> Tuple[Any, ...]:
    st = t.untyped_storage()
    ptr = st.data_ptr()
    if t.device.type == "meta" or ptr == 0:
        # meta storages have no address: the StorageImpl identity is the storage
        return (str(t.device), "impl", st._cdata)
    return (str(t.device), "ptr", ptr)


def _storage_nbytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


@dataclass
class SavedTensor:
    """One unique storage kept alive for backward.

    Attributes:
        shape: shape of the first tensor saved from this storage.
        dtype: its dtype.
        bytes: bytes of the whole storage (what stays allocated), not just the view's.
        saved_by: autograd node names that saved it (e.g. ``["MmBackward0"]``), when found.
        times_saved: how many times a tensor of this storage was packed.
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    bytes: int
    saved_by: List[str] = field(default_factory=list)
    times_saved: int = 1


@dataclass
class SavedBytes:
    """Result of :func:`saved_bytes`.

    Attributes:
        tensors: one :class:`SavedTensor` per unique storage, in first-saved order.
        excluded: how many packed tensors were parameters/buffers (or views of them) and not counted.
    """

    tensors: List[SavedTensor] = field(default_factory=list)
    excluded: int = 0

    @property
    def total_bytes(self) -> int:
        """Sum of unique saved storage bytes."""
        return sum(t.bytes for t in self.tensors)

    def per_token(self, num_tokens: int) -> float:
        """Saved bytes per token (``total_bytes / num_tokens``), e.g. ``num_tokens = M``."""
        if num_tokens <= 0:
            raise ValueError("num_tokens must be positive")
        return self.total_bytes / num_tokens

    def __int__(self) -> int:
        return self.total_bytes

    def __str__(self) -> str:
        lines = [f"SavedBytes: {self.total_bytes} B in {len(self.tensors)} storage(s) "
                 f"({self.excluded} parameter/buffer tensor(s) excluded)"]
        for t in self.tensors:
            lines.append(f"  {str(tuple(t.shape)):<20} {_dtype_str(t.dtype):<9} {t.bytes:>12} B  "
                         f"x{t.times_saved}  {','.join(t.saved_by) or '?'}")
        return "\n".join(lines)


def _param_storage_keys(fn, args, kwargs) -> set:
    keys = set()
    if isinstance(fn, nn.Module):
        for p in fn.parameters():
            keys.add(_storage_key(p))
        for b in fn.buffers():
            keys.add(_storage_key(b))
    for t in _tensors((args, kwargs)):
        if isinstance(t, nn.Parameter):
            keys.add(_storage_key(t))
    return keys


def saved_bytes(fn: Callable, *args, **kwargs) -> SavedBytes:
    """Bytes that autograd saves for backward during one forward of ``fn(*args, **kwargs)``.

    Runs ``fn`` once, on the given tensors (CPU by default; meta tensors work too), inside
    ``torch.autograd.graph.saved_tensors_hooks``. Every packed tensor is attributed to its storage;
    each storage counts once, with its full ``nbytes`` (a saved view keeps its whole storage alive).

    Excluded: ``nn.Parameter`` objects, tensors whose ``_base`` is a parameter (``W.t()`` saved by
    ``mm``), and any tensor sharing a storage with a parameter or buffer of ``fn`` (if it is an
    ``nn.Module``) or with a parameter among the arguments. Included: everything else -- activations,
    masks, and inputs that were saved (e.g. ``x`` saved by ``x @ A.T`` to compute ``dA``).

    Args:
        fn: a callable or an ``nn.Module``.
        *args, **kwargs: its arguments; inputs should carry the ``requires_grad`` they have in
            training (a saved tensor only exists if some gradient needs it).

    Returns:
        :class:`SavedBytes` (``total_bytes``, per-storage list with shapes, dtypes and the autograd
        nodes that saved them, ``per_token(num_tokens)``).
    """
    param_keys = _param_storage_keys(fn, args, kwargs)
    packed: List[torch.Tensor] = []  # index -> tensor (kept alive so storage keys stay unique)
    unpacked: List[int] = []  # indices unpacked since last cleared (for attribution)

    def pack(t: torch.Tensor):
        packed.append(t)
        return len(packed) - 1

    def unpack(i: int):
        unpacked.append(i)
        return packed[i]

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn(*args, **kwargs)

    # Attribute packed tensors to autograd nodes: reading a node's saved attributes calls ``unpack``.
    owner: Dict[int, List[str]] = defaultdict(list)
    roots = [t.grad_fn for t in _tensors(list(out.values()) if isinstance(out, dict) else out)
             if t.grad_fn is not None]
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        attrs = [a for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):  # custom autograd.Function / custom-op backward nodes
            attrs.append("saved_tensors")
        for a in attrs:
            unpacked.clear()
            try:
                getattr(node, a)
            except Exception:
                continue
            for i in unpacked:
                if node.name() not in owner[i]:
                    owner[i].append(node.name())
        stack.extend(nf for nf, _ in node.next_functions)

    result = SavedBytes()
    by_key: Dict[Tuple[Any, ...], SavedTensor] = {}
    for i, t in enumerate(packed):
        base = t._base if t._base is not None else t
        key = _storage_key(t)
        if isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter) or key in param_keys:
            result.excluded += 1
            continue
        rec = by_key.get(key)
        if rec is None:
            rec = SavedTensor(tuple(t.shape), t.dtype, _storage_nbytes(t), list(owner.get(i, [])), 1)
            by_key[key] = rec
            result.tensors.append(rec)
        else:
            rec.times_saved += 1
            rec.bytes = max(rec.bytes, _storage_nbytes(t))
            for n in owner.get(i, []):
                if n not in rec.saved_by:
                    rec.saved_by.append(n)
    return result


# --------------------------------------------------------------------------------------------------
# Roofline model
# --------------------------------------------------------------------------------------------------

# One place for device figures. H100 SXM as measured on this workplace's machine (docs/performance.md).
DEVICES: Dict[str, Dict[str, Any]] = {
    "h100": dict(
        label="modeled H100 (roofline)",
        tensor_flops=790e12,  # FLOP/s, dense bf16/fp16 tensor-core GEMM
        simt_flops=60e12,  # FLOP/s, everything else (fp32 GEMM, elementwise, reductions in any dtype)
        bandwidth=3.0e12,  # B/s, HBM3
        launch_s=2e-6,  # s per kernel launch
        sms=132,  # streaming multiprocessors: a launch of fewer CTAs gets that share of the FLOP rate above
        sm_bandwidth_share=2.0,  # one SM pulls at most this many SMs' fair share of HBM bandwidth (see occupancy)
        l2_bytes=50 * 2 ** 20,  # L2 size, for the re-reads a launch declares (core/cost.l2_reread)
    ),
}


# Our Triton GEMMs' share of the vendor GEMM's rate (cuBLAS at the tensor-core peak above). A model input, not
# a measurement: 0.75 until a measurement on a GPU replaces it (``PYFASTPEFT_TRITON_EFFICIENCY``, or the
# ``triton_efficiency=`` argument). Public H100 figures for pointer-load Triton GEMMs range 0.38-0.90.
TRITON_EFFICIENCY = 0.75
EFFICIENCY_RANGE = (0.65, 1.0)  # the range every modeled ratio of a Triton GEMM path is shown over


def triton_efficiency_source(device: str = "h100") -> Tuple[float, str]:
    """Our Triton GEMMs' share of cuBLAS's rate for ``device``, and where it came from: first
    ``PYFASTPEFT_TRITON_EFFICIENCY`` (a number in (0, 2]); else the figure measured by
    ``pyfastpeft bench --device cuda --smoke`` in a results file from a GPU of that generation
    (``PYFASTPEFT_RESULTS`` or shipped with the package, ``core/results.py``); else :data:`TRITON_EFFICIENCY`."""
    import os

    raw = os.environ.get("PYFASTPEFT_TRITON_EFFICIENCY", "").strip()
    if raw:
        try:
            e = float(raw)
        except ValueError:
            e = float("nan")
        if not 0 < e <= 2:
            raise ValueError(f"PYFASTPEFT_TRITON_EFFICIENCY must be a number in (0, 2], got {raw!r}")
        return e, "PYFASTPEFT_TRITON_EFFICIENCY"
    from pyfastpeft.core import results

    found = results.triton_efficiency(device)
    if found is not None:
        return found[0], f"measured, {found[1].name}"
    return TRITON_EFFICIENCY, "assumed, no GPU measurement"


def triton_efficiency(device: str = "h100") -> float:
    """The efficiency of :func:`triton_efficiency_source` (env, then a results file, then 0.75)."""
    return triton_efficiency_source(device)[0]


def occupancy(launch: Launch, device: str = "h100") -> Tuple[float, float]:
    """The shares of the GPU's FLOP rate and HBM bandwidth a launch can use, ``(compute, bandwidth)``; both 1
    when its grid is not declared (``Launch.ctas`` None: aten ops, cuBLAS / cuDNN). A MODEL, with CTAs = the
    grid size and SMs from :data:`DEVICES`:

    * compute: ``min(1, CTAs / SMs)``: tensor cores belong to SMs, and an SM without a CTA is idle;
    * bandwidth: ``min(1, CTAs · s / SMs)`` with ``s = sm_bandwidth_share`` (2.0 on the H100): one SM pulls at
      most ``s`` times its fair share of HBM bandwidth (2 × 3.0 TB/s / 132 ≈ 45 GB/s: what Little's law gives
      for the ~30 KB of loads a pipelined CTA keeps in flight at ~700 ns latency), so a launch needs
      ``SMs / s`` CTAs (66 on an H100) to reach the peak.
    """
    if launch.ctas is None:
        return 1.0, 1.0
    d = DEVICES[device]
    n = max(int(launch.ctas), 1)
    return min(1.0, n / d["sms"]), min(1.0, n * d["sm_bandwidth_share"] / d["sms"])


def is_ours(launch: Launch) -> bool:
    """A launch of our own Triton kernels (declared ``"triton:..."``), whose GEMM rate is a model input."""
    return launch.name.startswith("triton:")


@dataclass
class Roofline:
    """Modeled time of a :class:`Counts` on a device from :data:`DEVICES`. A model, not a measurement.

    Attributes:
        device: key into :data:`DEVICES`.
        label: e.g. ``"modeled H100 (roofline)"``.
        launches: ``(launch, seconds, bound)`` per launch, ``bound`` in ``{"compute", "memory"}``.
    """

    device: str
    label: str
    launches: List[Tuple[Launch, float, str]] = field(default_factory=list)
    triton_efficiency: float = TRITON_EFFICIENCY
    efficiency_source: str = "assumed, no GPU measurement"  # where triton_efficiency came from

    def time(self, phase: Optional[str] = None) -> float:
        """Modeled seconds, for one phase (``"fwd"``/``"bwd"``) or all (``None``)."""
        return sum(t for ln, t, _ in self.launches if phase is None or ln.phase == phase)

    @property
    def total_s(self) -> float:
        """Modeled seconds, all phases."""
        return self.time()

    @property
    def fwd_s(self) -> float:
        """Modeled forward seconds."""
        return self.time("fwd")

    @property
    def bwd_s(self) -> float:
        """Modeled backward seconds."""
        return self.time("bwd")

    @property
    def total_ms(self) -> float:
        """Modeled milliseconds, all phases."""
        return self.total_s * 1e3

    def __str__(self) -> str:
        agg: "OrderedDict[Tuple[str, str], List[float]]" = OrderedDict()
        for ln, t, bound in self.launches:
            d = agg.setdefault((ln.phase, ln.name), [0, 0.0, 0, 0])
            d[0] += 1
            d[1] += t
            d[2] += t if bound == "compute" else 0.0
        lines = [f"{self.label}: total {self.total_s * 1e6:.2f} us "
                 f"(fwd {self.fwd_s * 1e6:.2f} us, bwd {self.bwd_s * 1e6:.2f} us)"]
        for (p, name), (n, t, tc, _) in agg.items():
            lines.append(f"  {p:<4} {name:<40} x{n:<4} {t * 1e6:10.2f} us  "
                         f"({100.0 * tc / t if t else 0.0:.0f}% compute-bound time)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Roofline[{self.label}](total={self.total_s * 1e6:.3f} us, fwd={self.fwd_s * 1e6:.3f} us, "
                f"bwd={self.bwd_s * 1e6:.3f} us, launches={len(self.launches)})")


def launch_time(launch: Launch, device: str = "h100", triton_efficiency: Optional[float] = None) -> Tuple[float, str]:
    """Modeled seconds of one launch and whether it is compute- or memory-bound.

    Args:
        launch: the launch.
        device: key into :data:`DEVICES`.
        triton_efficiency: share of the vendor GEMM's rate our Triton GEMMs reach (default
            :func:`triton_efficiency`); applies to our tensor-core launches only.

    Returns:
        ``(max(flops / (P·oc), (bytes + reread) / (BW·om)) + launch_s, "compute" | "memory")`` with
        ``(oc, om)`` the launch's :func:`occupancy` and ``reread`` the bytes it declares it reads again after
        L2 evicted them.
    """
    d = DEVICES[device]
    peak = d["tensor_flops"] if (launch.tensor_core and launch.dtype in _HALF) else d["simt_flops"]
    if is_ours(launch) and launch.tensor_core and launch.dtype in _HALF:
        peak *= triton_efficiency if triton_efficiency is not None else globals()["triton_efficiency"](device)
    occ_c, occ_m = occupancy(launch, device)
    tc = launch.flops / (peak * occ_c)
    tm = (launch.bytes + launch.reread) / (d["bandwidth"] * occ_m)
    return max(tc, tm) + d["launch_s"], ("compute" if tc > tm else "memory")


def roofline(counts: Counts, device: str = "h100", triton_efficiency: Optional[float] = None) -> Roofline:
    """Modeled time of every launch in ``counts``: ``t = max(FLOPs / P, bytes / BW) + launch``.

    The peak ``P`` per launch (the dtype rule):

    * ``P = 790e12`` FLOP/s only for tensor-core launches (``Launch.tensor_core``: aten GEMMs
      ``mm/addmm/bmm/baddbmm/...``, convolutions, attention) whose dtype is fp16 or bf16;
    * ``P = 60e12`` FLOP/s for everything else: fp32 GEMMs (TF32 is not assumed), and pointwise ops,
      reductions and copies in any dtype.

    ``BW = 3.0e12`` B/s and a launch costs ``2e-6`` s (:data:`DEVICES`). Our own Triton GEMMs (launches
    named ``"triton:..."``) get ``triton_efficiency × P`` (:func:`triton_efficiency_source`: the env
    variable, else a GPU measurement in a results file, else 0.75): the vendor GEMM is the floor, and ours
    are not assumed to match it until a GPU says so. A launch that declares its grid gets only
    ``min(1, CTAs / SMs)`` of ``P`` and ``min(1, 2 · CTAs / SMs)`` of ``BW`` (:func:`occupancy`), and the
    bytes it declares it re-reads after L2 evicted them are added to its bytes (``core/cost.l2_reread``).

    Args:
        counts: from :func:`count` (or assembled from declared :class:`Launch` es).
        device: key into :data:`DEVICES`; only ``"h100"`` is defined.
        triton_efficiency: overrides the default share of cuBLAS's rate for our Triton GEMMs.

    Returns:
        :class:`Roofline` with per-launch times and per-phase totals, labelled as modeled.
    """
    if device not in DEVICES:
        raise KeyError(f"unknown device {device!r}; known: {sorted(DEVICES)}")
    if triton_efficiency is not None:
        e, src = triton_efficiency, "given"
    else:
        e, src = triton_efficiency_source(device)
    rl = Roofline(device=device, label=f"{DEVICES[device]['label']}, Triton GEMMs at {e:g} of cuBLAS ({src})",
                  triton_efficiency=e, efficiency_source=src)
    for ln in counts.ops:
        t, bound = launch_time(ln, device, e)
        rl.launches.append((ln, t, bound))
    return rl


def break_even(counts: Counts, baseline_s: float, device: str = "h100") -> Optional[float]:
    """The Triton GEMM efficiency at which ``counts`` is modeled exactly as fast as ``baseline_s`` (e.g. the
    cuBLAS path's modeled time): below it the baseline wins. ``0.0`` when ``counts`` wins at any efficiency
    (no Triton GEMM in it, or it wins even so), ``None`` when it loses even at twice cuBLAS's rate."""
    t = lambda e: roofline(counts, device, triton_efficiency=e).time()  # noqa: E731  (non-increasing in e)
    if t(1e-3) <= baseline_s:
        return 0.0
    if t(2.0) > baseline_s:
        return None
    lo, hi = 1e-3, 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if t(mid) <= baseline_s else (mid, hi)
    return hi


def _install() -> None:
    """Register every family's declared costs and let cost functions count PyTorch code paths."""
    from pyfastpeft.families import cost_tables

    _cost.install_counter(lambda fn, *args: list(count(fn, *args).ops))
    for qualname, fn in cost_tables().items():
        register_cost(qualname, fn)


_install()
