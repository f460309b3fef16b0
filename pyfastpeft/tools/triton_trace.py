"""Count the memory that Triton kernels really touch, by tracing the Triton interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` of an interpreted kernel ends in a
method of the interpreter's builder (``triton.runtime.interpreter.InterpreterBuilder``):
``create_load``/``create_store`` (unmasked), ``create_masked_load``/``create_masked_store``; tensor
descriptors and gathers go through the masked ones. Each receives a ``TensorHandle`` of pointers (a
numpy array of byte addresses) whose element type gives the access width, and a mask.

:func:`trace_memory` wraps those methods on the class for the duration of a ``with`` block and records,
per access, the addresses of the active (mask-true) lanes. At the end it reports the **unique** bytes
loaded and stored (the union of ``[addr, addr + width)`` intervals, so reading an element twice, from
one program or from several, counts once) and the lane-element counts including repeats.

This is the measurement behind the declared byte formulas of our launchers (``docs/performance.md``
section 1.2): at small shapes, ``declared_bytes == trace.loaded_bytes + trace.stored_bytes`` when every
element is read or written once from HBM.

Limits:

* Interpreter only: compiled kernels on a GPU are not traced (nothing is recorded, and
  :func:`trace_memory` raises if the interpreter's builder cannot be found).
* Atomics (``tl.atomic_*``) are counted as both a load and a store of their active lanes.
* Unique bytes are per address, not per tensor; :meth:`MemoryTrace.loaded_bytes_in` restricts the
  count to one tensor's storage. Under the interpreter a CPU tensor is accessed in place; a CUDA
  tensor is copied to host first, so per-tensor attribution only works for CPU tensors.
* Memory is ``O(number of lane accesses)`` until :meth:`MemoryTrace.finalize`; fine for test shapes.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

__all__ = ["MemoryTrace", "trace_memory", "unique_bytes"]

# Builder methods by role. The unmasked ones delegate to the masked ones in triton 3.x; the reentrancy
# guard below makes the count right whether or not they do.
_LOADS = ("create_load", "create_masked_load")
_STORES = ("create_store", "create_masked_store")
_ATOMICS = ("create_atomic_rmw", "create_atomic_cas")


def unique_bytes(addrs: np.ndarray, widths: np.ndarray) -> int:
    """Size of the union of byte intervals ``[addrs[i], addrs[i] + widths[i])``.

    Args:
        addrs: int64/uint64 start addresses, shape ``(L,)``.
        widths: access widths in bytes, shape ``(L,)``.

    Returns:
        The number of distinct bytes covered.
    """
    if addrs.size == 0:
        return 0
    a = addrs.astype(np.int64, copy=False)
    w = widths.astype(np.int64, copy=False)
    # fast path: one width, element-aligned -> distinct starts x width
    if np.all(w == w[0]):
        u = np.unique(a)
        if u.size < 2 or int(np.diff(u).min()) >= int(w[0]):
            return int(u.size) * int(w[0])
    order = np.lexsort((-w, a))
    s, e = a[order], a[order] + w[order]
    run_end = np.maximum.accumulate(e)
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] >= run_end[:-1]  # a gap (or touching) starts a new merged interval
    starts = np.flatnonzero(new)
    seg_end = np.maximum.reduceat(e, starts)
    return int((seg_end - s[starts]).sum())


@dataclass
class _Side:
    addrs: List[np.ndarray] = field(default_factory=list)
    widths: List[np.ndarray] = field(default_factory=list)
    ops: int = 0

    def add(self, addrs: np.ndarray, width: int) -> None:
        if addrs.size == 0:
            return
        self.ops += int(addrs.size)
        self.addrs.append(addrs)
        self.widths.append(np.full(addrs.shape, width, dtype=np.int64))

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        if not self.addrs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(self.addrs) > 1:
            self.addrs = [np.concatenate(self.addrs)]
            self.widths = [np.concatenate(self.widths)]
        return self.addrs[0], self.widths[0]


class MemoryTrace:
    """Memory accesses recorded by :func:`trace_memory`.

    Attributes:
        load_ops: number of lane-element loads executed (mask-true lanes, repeats included).
        store_ops: number of lane-element stores executed (same convention).
        loaded_bytes: distinct bytes read (union over all loads).
        stored_bytes: distinct bytes written.
        load_calls: builder calls that loaded (one per ``tl.load`` per program instance).
        store_calls: builder calls that stored.
    """

    def __init__(self) -> None:
        self._load = _Side()
        self._store = _Side()
        self.load_calls = 0
        self.store_calls = 0

    @property
    def load_ops(self) -> int:
        return self._load.ops

    @property
    def store_ops(self) -> int:
        return self._store.ops

    @property
    def loaded_bytes(self) -> int:
        return unique_bytes(*self._load.arrays())

    @property
    def stored_bytes(self) -> int:
        return unique_bytes(*self._store.arrays())

    @property
    def total_bytes(self) -> int:
        """``loaded_bytes + stored_bytes`` (an element read and written counts twice, as in HBM traffic)."""
        return self.loaded_bytes + self.stored_bytes

    @staticmethod
    def _within(side: _Side, tensor: Any) -> int:
        a, w = side.arrays()
        st = tensor.untyped_storage()
        lo = int(st.data_ptr())
        hi = lo + int(st.nbytes())
        sel = (a >= lo) & (a < hi)
        return unique_bytes(a[sel], w[sel])

    def loaded_bytes_in(self, tensor: Any) -> int:
        """Distinct bytes loaded from ``tensor``'s storage (CPU tensors only, see module docstring)."""
        return self._within(self._load, tensor)

    def stored_bytes_in(self, tensor: Any) -> int:
        """Distinct bytes stored into ``tensor``'s storage (CPU tensors only)."""
        return self._within(self._store, tensor)

    def finalize(self) -> "MemoryTrace":
        """Compact the recorded addresses (concatenate); returns ``self``."""
        self._load.arrays()
        self._store.arrays()
        return self

    def __repr__(self) -> str:
        return (f"MemoryTrace(loaded_bytes={self.loaded_bytes}, stored_bytes={self.stored_bytes}, "
                f"load_ops={self.load_ops}, store_ops={self.store_ops})")


def _element_bytes(ptr_handle: Any) -> int:
    """Access width (bytes) of a pointer ``TensorHandle``: the pointee's bit width / 8 (bool -> 1)."""
    ty = ptr_handle.dtype
    # pointer_type -> element_ty; block types -> element_ty; walk until a scalar
    for _ in range(4):
        nxt = getattr(ty, "element_ty", None)
        if nxt is None:
            break
        ty = nxt
    bits = getattr(ty, "primitive_bitwidth", None)
    if bits is None:
        raise TypeError(f"triton_trace: cannot get the element width of pointer type {ptr_handle.dtype}")
    return max(1, int(bits) // 8)


def _active(ptr_handle: Any, mask_handle: Any) -> np.ndarray:
    addrs = np.asarray(ptr_handle.data).astype(np.int64, copy=False)
    if mask_handle is None:
        return addrs.reshape(-1)
    mask = np.asarray(mask_handle.data).astype(bool, copy=False)
    mask = np.broadcast_to(mask, addrs.shape)
    return addrs[mask]


def _find_builder_class():
    try:
        from triton.runtime import interpreter as interp
    except Exception as e:  # triton missing or broken
        raise RuntimeError(f"triton_trace: cannot import triton.runtime.interpreter ({e!r})") from e
    cls = getattr(interp, "InterpreterBuilder", None)
    if cls is None:
        # older/newer layouts: the module-level builder instance
        inst = getattr(interp, "interpreter_builder", None)
        cls = type(inst) if inst is not None else None
    if cls is None:
        raise RuntimeError("triton_trace: triton.runtime.interpreter has no InterpreterBuilder; "
                           "this triton version is not supported")
    found = [n for n in _LOADS + _STORES if callable(getattr(cls, n, None))]
    if not any(n in found for n in _LOADS) or not any(n in found for n in _STORES):
        raise RuntimeError(f"triton_trace: the interpreter builder {cls.__qualname__} has none of the "
                           f"load/store entry points {_LOADS + _STORES}; this triton version is not supported")
    return cls


_ACTIVE: List[MemoryTrace] = []  # nested traces all record
_LOCK = threading.Lock()
_STATE = threading.local()  # reentrancy depth: create_load -> create_masked_load counts once


def _make_wrapper(name: str, orig: Callable) -> Callable:
    def wrapper(self, *args, **kwargs):
        depth = getattr(_STATE, "depth", 0)
        if depth == 0 and _ACTIVE:
            _record(name, args, kwargs)
        _STATE.depth = depth + 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            _STATE.depth = depth

    wrapper.__name__ = name
    wrapper.__wrapped__ = orig
    wrapper._pfp_trace = True
    return wrapper


def _arg(args, kwargs, i, name):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else None


def _record(name: str, args: tuple, kwargs: dict) -> None:
    if name == "create_load":  # (ptr, cache, evict, is_volatile)
        ptr, mask, kinds = _arg(args, kwargs, 0, "ptr"), None, ("load",)
    elif name == "create_masked_load":  # (ptrs, mask, other, cache, evict, is_volatile)
        ptr, mask, kinds = _arg(args, kwargs, 0, "ptrs"), _arg(args, kwargs, 1, "mask"), ("load",)
    elif name == "create_store":  # (ptr, val, cache, evict)
        ptr, mask, kinds = _arg(args, kwargs, 0, "ptr"), None, ("store",)
    elif name == "create_masked_store":  # (ptrs, value, mask, cache, evict)
        ptr, mask, kinds = _arg(args, kwargs, 0, "ptrs"), _arg(args, kwargs, 2, "mask"), ("store",)
    elif name == "create_atomic_rmw":  # (op, ptr, val, mask, sem, scope)
        ptr, mask, kinds = _arg(args, kwargs, 1, "ptr"), _arg(args, kwargs, 3, "mask"), ("load", "store")
    elif name == "create_atomic_cas":  # (ptr, cmp, val, sem, scope)
        ptr, mask, kinds = _arg(args, kwargs, 0, "ptr"), None, ("load", "store")
    else:  # pragma: no cover
        return
    if ptr is None:
        return
    addrs = _active(ptr, mask)
    width = _element_bytes(ptr)
    for tr in _ACTIVE:
        for k in kinds:
            if k == "load":
                tr._load.add(addrs, width)
                tr.load_calls += 1
            else:
                tr._store.add(addrs, width)
                tr.store_calls += 1


# method name -> (original attribute or None if inherited), while any trace is active
_PATCHED: Dict[str, Optional[Callable]] = {}


@contextlib.contextmanager
def trace_memory() -> Iterator[MemoryTrace]:
    """Record the memory accesses of Triton kernels run by the interpreter inside the block.

    Yields:
        A :class:`MemoryTrace`; read ``loaded_bytes``, ``stored_bytes``, ``load_ops``, ``store_ops``
        after (or during) the block.

    Raises:
        RuntimeError: triton's interpreter builder or its load/store methods cannot be found.

    Example:
        >>> with trace_memory() as tr:                                     # doctest: +SKIP
        ...     copy_kernel[(2,)](x, y, n, BLOCK=64)
        >>> tr.loaded_bytes == x.numel() * x.element_size()                # doctest: +SKIP
        True

    Note:
        ``TRITON_INTERPRET=1`` must be set before the kernels are *defined* (decorated); this
        function does not set it. Kernels compiled for a GPU are not traced.
    """
    cls = _find_builder_class()
    tr = MemoryTrace()
    with _LOCK:
        if not _ACTIVE:
            for n in _LOADS + _STORES + _ATOMICS:
                orig = getattr(cls, n, None)
                if orig is None or not callable(orig):
                    continue
                _PATCHED[n] = cls.__dict__.get(n)  # None: inherited, restored by deleting ours
                setattr(cls, n, _make_wrapper(n, orig))
        _ACTIVE.append(tr)
    try:
        yield tr
    finally:
        with _LOCK:
            _ACTIVE.remove(tr)
            if not _ACTIVE:
                for n, orig in _PATCHED.items():
                    if orig is None:
                        delattr(cls, n)
                    else:
                        setattr(cls, n, orig)
                _PATCHED.clear()
        tr.finalize()
