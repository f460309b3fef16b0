"""One backend registry for every primitive op: ``cuda`` / ``triton`` / ``torch``, chosen per call.

Selection order for one call (first that applies wins):

1. the explicit ``backend=`` argument of the op;
2. the :func:`use_backend` context manager (a contextvar);
3. ``PYFASTPEFT_BACKEND``: one name for every op (``triton``) or a per-op table
   (``lora_linear=torch,cayley=triton``; a key is a public op or a primitive such as ``lora_linear_bwd``);
4. auto: the op's preference order (``cuda``, ``triton``, ``torch`` unless the op says otherwise, with
   its reason), the first that is installed, runs on the tensors' device and accepts the arguments.

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
    """

    name: str
    fn: Callable
    devices: Callable[[], tuple[str, ...]]
    available: Callable[[], bool] = _always
    supports: Callable[..., Optional[str]] = _accept
    why_unavailable: Callable[[], str] = lambda: "not available in this install"


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

    def __str__(self) -> str:
        head = f"{self.op}: " + (f"forced {self.forced!r}" if self.forced else "auto")
        body = "\n".join(f"  {name:<7} {why}" for name, why in self.rows)
        tail = f"  -> {self.chosen}" if self.chosen else "  -> no backend can run this call"
        return f"{head}\n{body}\n{tail}"


class OpRegistry:
    """Backends of one primitive op (``<op>_fwd`` / ``<op>_bwd``)."""

    def __init__(self, op: str, public: Optional[str] = None, order: tuple[str, ...] = ORDER):
        if sorted(order) != sorted(ORDER):
            raise ValueError(f"{op}: order must be a permutation of {ORDER}, got {order}")
        self.op = op
        self.public = public or op.rsplit("_", 1)[0]
        self.order = tuple(order)
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

    def explain(self, device: torch.device, *args, backend: Optional[str] = None, **kwargs) -> Decision:
        forced = _check_name(backend, self.op) or _ctx_backend.get() or _env_choice(self.op, self.public)
        dec = Decision(self.op, forced, None)
        for name in (forced,) if forced else self.order:
            status, why = self._verdict(name, device, args, kwargs)
            if status == "ok" and dec.chosen is None:
                dec.chosen = name
                dec.rows.append((name, "chosen"))
            else:
                dec.rows.append((name, why if why else "not tried (an earlier backend was chosen)"))
        return dec

    def select(self, device: torch.device, *args, backend: Optional[str] = None, **kwargs) -> Backend:
        forced = _check_name(backend, self.op) or _ctx_backend.get() or _env_choice(self.op, self.public)
        reasons: dict[str, str] = {}
        for name in (forced,) if forced else self.order:
            status, why = self._verdict(name, device, args, kwargs)
            if status == "ok":
                self._log_fallbacks(name, reasons)
                _LAST[self.op] = name
                return self._impls[name]
            reasons[name] = why or status
            if status == "unsupported" and not forced and strict():
                raise BackendUnavailable(
                    f"{self.op}: backend {name!r} rejected the call: {why} (PYFASTPEFT_STRICT=1 forbids falling back)")
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
