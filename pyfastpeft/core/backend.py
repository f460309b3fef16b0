"""One backend registry for every primitive op: ``cuda`` / ``triton`` / ``torch``, chosen per call.

Selection order for one call (first that applies wins):

1. the explicit ``backend=`` argument of the op;
2. the :func:`use_backend` context manager (a contextvar);
3. ``PYFASTPEFT_BACKEND``: one name for every op (``triton``) or a per-op table
   (``lora_linear=torch,cayley=triton``; a key is a public op or a primitive such as ``lora_linear_bwd``);
4. auto: among the backends that are installed, run on the tensors' device and accept the arguments:
   on a GPU where more than one can run the call, the fastest as *measured* on this GPU on first use and
   remembered on disk (``core/tune.py``; ``PYFASTPEFT_TUNE=0`` turns measuring off); otherwise, and while
   ``torch.compile`` traces or a CUDA graph is captured with no remembered decision, the static default:
   the fastest for this GPU and shape bucket in a results file (``core/results.py``), else the first in the op's preference order (``cuda``, ``triton``, ``torch`` unless the op says otherwise,
   with its reason), where on CUDA an op whose work is a large GEMM puts its cuBLAS-backed backends first
   (its *vendor order*): a fused Triton GEMM has to win a measurement to be used.

A *forced* backend (1-3) that cannot run raises :class:`BackendUnavailable` with its reason; it never
falls back. In auto mode each fallback is logged once at INFO per (op, backend, reason), and
``PYFASTPEFT_STRICT=1`` turns a backend that is installed and runs on the device but rejects the
*arguments* (dtype, rank limit, ...) into an error instead of a fallback. A wrong device is "not
applicable" and is never an error in auto mode.

Nothing here touches CUDA at import, and nothing is cached on tensors.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger("pyfastpeft")

ORDER: tuple[str, ...] = ("cuda", "triton", "torch")
_ctx_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pyfastpeft_backend", default=None)

# primitive op name -> registry; filled as ops modules are imported
REGISTRIES: dict[str, "OpRegistry"] = {}
# primitive op name -> the backend that ran its last call (debugging aid, see last_backend())
_LAST: dict[str, str] = {}
# primitive op name -> how its last auto choice among several runnable backends was made (see last_choice())
_HOW: dict[str, str] = {}
# primitive op name -> which implementation variant of its backend ran last, and how it was chosen
_VARIANT: dict[str, str] = {}
# while record_calls() is active: (primitive op, shape bucket, backend) of every call that selects a backend
_RECORDER: Optional[list] = None


@contextlib.contextmanager
def record_calls() -> Iterator[list]:
    """Collect ``(primitive op, shape bucket, backend)`` of every call made inside the block (the smoke
    command uses it to key its timings exactly as the dispatch looks them up)."""
    global _RECORDER
    prev, _RECORDER = _RECORDER, []
    try:
        yield _RECORDER
    finally:
        _RECORDER = prev


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call, or (strict mode) the preferred one rejected it."""


def _check_name(name: Optional[str], where: str) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str) or name.strip().lower() not in ORDER:
        raise ValueError(f"{where}: backend must be one of {ORDER} or None, got {name!r}")
    return name.strip().lower()


def _always() -> bool:
    return True


def _accept(*args, **kwargs) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of a primitive op.

    Args:
        name: ``"cuda"``, ``"triton"`` or ``"torch"``.
        fn: the implementation; called with the primitive's arguments (without ``backend``).
        devices: evaluated per call, the device types it runs on (e.g. ``("cuda",)``).
        available: cheap, lazy check that it is installed (no device query at import).
        supports: ``None`` when it accepts the arguments, else a short reason (shape/dtype limits).
        why_unavailable: a reason string for :func:`backend_info` when ``available()`` is false.
        variant: for a backend with several implementations of the op (LoRA's ``triton``: rank-r kernels
            plus cuBLAS, or fused Triton GEMMs), ``variant(device, *args, measure=False)`` returns
            ``(variant name, how it was chosen)`` without running anything; :meth:`OpRegistry.explain`
            shows it. The backend's ``fn`` makes the same choice and reports it with :func:`note_variant`.
    """

    name: str
    fn: Callable
    devices: Callable[[], tuple[str, ...]]
    available: Callable[[], bool] = _always
    supports: Callable[..., Optional[str]] = _accept
    why_unavailable: Callable[[], str] = lambda: "not available in this install"
    variant: Optional[Callable[..., tuple[str, str]]] = None


def strict() -> bool:
    return os.environ.get("PYFASTPEFT_STRICT", "0").strip() == "1"


def _env_choice(op: str, public: str) -> Optional[str]:
    raw = os.environ.get("PYFASTPEFT_BACKEND", "").strip()
    if not raw:
        return None
    if "=" not in raw:
        return _check_name(raw, "PYFASTPEFT_BACKEND")
    table: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"PYFASTPEFT_BACKEND: expected 'op=backend' items separated by commas, got {item!r}")
        key, val = (s.strip() for s in item.split("=", 1))
        table[key] = _check_name(val, f"PYFASTPEFT_BACKEND[{key}]")
    return table.get(op) or table.get(public)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (an explicit ``backend=`` still wins)."""
    token = _ctx_backend.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _ctx_backend.reset(token)


@dataclass
class Decision:
    """What :meth:`OpRegistry.explain` found for one call."""

    op: str
    forced: Optional[str]
    chosen: Optional[str]
    rows: list[tuple[str, str]] = field(default_factory=list)  # (backend, "chosen" | reason)
    how: str = ""  # how the choice among runnable backends was made (measured, remembered, static)
    variant: Optional[str] = None  # the chosen backend's implementation variant, where it has several
    variant_how: str = ""  # how that variant was chosen

    def __str__(self) -> str:
        head = f"{self.op}: " + (f"forced {self.forced!r}" if self.forced else "auto")
        body = "\n".join(f"  {name:<7} {why}" for name, why in self.rows)
        tail = f"  -> {self.chosen}" if self.chosen else "  -> no backend can run this call"
        if self.variant:
            tail += f", variant {self.variant!r} ({self.variant_how})"
        how = f"\n  ({self.how})" if self.how else ""
        return f"{head}\n{body}\n{tail}{how}"


class OpRegistry:
    """Backends of one primitive op (``<op>_fwd`` / ``<op>_bwd``)."""

    def __init__(self, op: str, public: Optional[str] = None, order: tuple[str, ...] = ORDER,
                 vendor_order: Optional[tuple[str, ...]] = None):
        for what, o in (("order", order), ("vendor_order", vendor_order)):
            if o is not None and sorted(o) != sorted(ORDER):
                raise ValueError(f"{op}: {what} must be a permutation of {ORDER}, got {o}")
        self.op = op
        self.public = public or op.rsplit("_", 1)[0]
        self.order = tuple(order)
        # the static default on CUDA for ops whose work is a large GEMM: cuBLAS-backed backends first
        self.vendor_order = tuple(vendor_order) if vendor_order else None
        self._impls: dict[str, Backend] = {}
        self._logged: set[tuple[str, str, str]] = set()
        REGISTRIES[op] = self

    def register(self, backend: Backend) -> None:
        if backend.name not in ORDER:
            raise ValueError(f"{self.op}: unknown backend name {backend.name!r}")
        self._impls[backend.name] = backend

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if n in self._impls)

    def _verdict(self, name: str, device: torch.device, args, kwargs) -> tuple[str, Optional[str]]:
        """('ok' | 'absent' | 'n/a' | 'unsupported', reason)."""
        impl = self._impls.get(name)
        if impl is None:
            return "absent", "not implemented for this op"
        if not impl.available():
            return "absent", impl.why_unavailable()
        if device.type not in impl.devices():
            return "n/a", f"does not run on {device.type} tensors"
        why = impl.supports(*args, **kwargs)
        if why is not None:
            return "unsupported", why
        return "ok", None

    def static_order(self, device: torch.device) -> tuple[str, ...]:
        """The order used without a measurement: the vendor order on CUDA where the op declares one."""
        return self.vendor_order if (self.vendor_order and device.type == "cuda") else self.order

    def _measured(self, device: torch.device, oks: list[str], args, kwargs, *, measure: bool):
        """A measured or remembered choice among ``oks`` (None: use the static default), and how it was made."""
        from pyfastpeft.core import tune

        if len(oks) < 2 or not tune.hooks.measurable_device(device):
            return None, ""
        if not tune.enabled():
            return self._shipped(device, oks, args, "PYFASTPEFT_TUNE=0: nothing measured")
        if measure and tune.allowed(device):
            m = tune.choose(self.op, device, args, oks, lambda n: (lambda: self._impls[n].fn(*args, **kwargs)))
        else:
            m = tune.lookup(self.op, device, args, oks)
        if m is not None:
            return m.chosen, m.describe()
        if measure:  # tracing or capturing with nothing remembered
            return self._shipped(device, oks, args,
                                 "not measured here (torch.compile tracing or CUDA graph capture)")
        return None, f"not measured yet: the first call on this GPU times {', '.join(oks)}"

    def _shipped(self, device: torch.device, oks: list[str], args, why: str):
        """Without a measurement: a results file's fastest backend for this GPU and shape, else the static order."""
        from pyfastpeft.core import tune

        found = tune.shipped(self.op, device, args, oks)
        if found is not None:
            return found[0], f"{why}: {found[1]}"
        return None, f"{why}: static default"

    def explain(self, device: torch.device, *args, backend: Optional[str] = None, **kwargs) -> Decision:
        forced = _check_name(backend, self.op) or _ctx_backend.get() or _env_choice(self.op, self.public)
        dec = Decision(self.op, forced, None)
        names = (forced,) if forced else self.static_order(device)
        verdicts = {name: self._verdict(name, device, args, kwargs) for name in names}
        oks = [n for n in names if verdicts[n][0] == "ok"]
        if not forced:
            dec.chosen, dec.how = self._measured(device, oks, args, kwargs, measure=False)
        if dec.chosen is None and oks:
            dec.chosen = oks[0]
        impl = self._impls.get(dec.chosen) if dec.chosen else None
        if impl is not None and impl.variant is not None:
            dec.variant, dec.variant_how = impl.variant(device, *args, measure=False, **kwargs)
        for name in names:
            status, why = verdicts[name]
            if name == dec.chosen:
                dec.rows.append((name, "chosen"))
            elif status == "ok":
                dec.rows.append((name, "runs this call; not chosen"))
            else:
                dec.rows.append((name, why or status))
        return dec

    def select(self, device: torch.device, *args, backend: Optional[str] = None, **kwargs) -> Backend:
        forced = _check_name(backend, self.op) or _ctx_backend.get() or _env_choice(self.op, self.public)
        reasons: dict[str, str] = {}
        oks: list[str] = []
        from pyfastpeft.core import tune

        # on a measurable device every backend is a candidate; elsewhere the first that runs the call wins
        every = not forced and tune.hooks.measurable_device(device)
        for name in (forced,) if forced else self.static_order(device):
            status, why = self._verdict(name, device, args, kwargs)
            if status == "ok":
                oks.append(name)
                if not every:
                    break
                continue
            reasons[name] = why or status
            if status == "unsupported" and not forced and strict() and not oks:
                raise BackendUnavailable(
                    f"{self.op}: backend {name!r} rejected the call: {why} (PYFASTPEFT_STRICT=1 forbids falling back)")
        if oks:
            chosen = oks[0]
            if every:
                measured, how = self._measured(device, oks, args, kwargs, measure=True)
                chosen = measured or chosen
                _HOW[self.op] = how
            self._log_fallbacks(chosen, reasons)
            _LAST[self.op] = chosen
            if _RECORDER is not None:
                _RECORDER.append((self.op, tune.bucket(args), chosen))
            return self._impls[chosen]
        if forced:
            raise BackendUnavailable(f"{self.op}: forced backend {forced!r} cannot run this call: {reasons[forced]}")
        raise BackendUnavailable(f"{self.op}: no backend can run this call: {reasons}")

    def _log_fallbacks(self, chosen: str, reasons: dict[str, str]) -> None:
        for name, why in reasons.items():
            key = (name, why, chosen)
            if key not in self._logged:
                self._logged.add(key)
                log.info("pyfastpeft %s: skipped %s (%s); using %s", self.op, name, why, chosen)
        key = ("", "", chosen)
        if key not in self._logged:
            self._logged.add(key)
            log.info("pyfastpeft %s: running on backend %r", self.op, chosen)


def note_variant(op: str, variant: str, how: str) -> None:
    """Called by a backend with several implementations: which one ran this call of ``op``, and why."""
    _VARIANT[op] = f"variant {variant!r} ({how})"


def last_choice(op: str) -> str:
    """How the most recent auto call of primitive ``op`` on a GPU chose among its runnable backends
    ("measured on NVIDIA H100: triton 0.81 ms, torch 0.9 ms -> triton", "PYFASTPEFT_TUNE=0: ..."), followed
    by the variant of a backend with several implementations that ran last ("variant 'vendor' (static
    default ...)"); "" if neither ever happened."""
    return "; ".join(p for p in (_HOW.get(op, ""), _VARIANT.get(op, "")) if p)


def last_backend(op: str) -> Optional[str]:
    """The backend that ran the most recent eager call of primitive ``op`` (e.g. ``"lora_linear_fwd"``)."""
    return _LAST.get(op)


# ---------------------------------------------------------------------------------------- Triton backends
def triton_available() -> bool:
    """Triton is importable here (every op's ``triton`` backend shares this test)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def triton_why() -> str:
    return "triton is not installed (pip install triton)"


def triton_devices() -> tuple[str, ...]:
    """CUDA tensors when compiled; also CPU tensors under ``TRITON_INTERPRET=1``."""
    from pyfastpeft.core.triton_config import interpreting

    return ("cuda", "cpu") if interpreting() else ("cuda",)
