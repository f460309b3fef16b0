"""Subtractive fine-tuning (SFP): replace redundant modules by compact linear filter blocks.

Jiang et al., "Less Is More: Rethinking Parameter-Efficient Fine-Tuning from a Subtractive Perspective",
AAAI 2026; the maths and our choices are in ``docs/subtractive.md``.

* :func:`fit` runs the user's calibration batches through the model with forward hooks on the target
  modules, accumulates ``G = X̃ᵀX̃`` and ``C = X̃ᵀY`` per module (``X̃ = [X, 1]``; rows are never held:
  one ``gram_accumulate`` call per batch, added in fp64), solves for a filter block per module, replaces
  each module in place by a :class:`pyfastpeft.nn.FilterBlock`, freezes every other parameter, and
  returns a :class:`FitReport` (errors, rows, parameters before and after, per module).
* :func:`rank_modules` fits every candidate in one pass over the data and sorts them by fit error, with
  the parameter saving of each: the "which modules are redundant" measure. It does not change the model.

Solve (fp64, once per module, ``d = K + 1`` with the bias column):

* ``method="ridge"``: ``F = (G + λ·tr(G)/d·I)⁻¹ C`` (Cholesky); with ``λ = 0`` and a singular ``G`` it
  falls back to ``pinv`` and warns once.
* ``method="pinv"``: ``F = G⁺ C`` from the eigen-decomposition of ``G``, eigenvalues below
  ``rcond · max`` dropped (``rcond`` default ``d · eps`` of the accumulation dtype: fp32 statistics carry
  relative noise of that order).
* ``rank=k``: reduced-rank regression. The bias is kept full (``b = ȳ − x̄W``); the weight is the best
  rank-``k`` map in the data's metric: with ``S = (Σ_c + λ')^{1/2}`` (``Σ_c`` the centred Gram), the
  truncated SVD of ``S W`` gives ``W_k = S⁻¹ U_k Σ_k V_kᵀ``, so it minimises the same least-squares error.
* ``diagonal=True`` (``K == N``): per-feature ``y_c = s_c x_c + b_c``, from the diagonals of ``G`` and ``C``.

Errors: ``‖Y − X̃F‖_F / ‖Y‖_F``. On the calibration rows, still in one pass and without the cancellation of
``‖Y‖² − 2⟨F, C⟩ + ⟨F, GF⟩`` (whose fp32 floor, ~3e-4, hid every near-linear module): each batch's rows are
compared, in fp64, with a reference solution ``F₀`` (solved once from the first ``2·d`` rows' statistics with
the fit's ``ridge``/``method``): ``A = Σ‖Y − X̃F₀‖²``, ``V = X̃ᵀ(Y − X̃F₀)`` and the rows' fp64 Gram ``G₆₄``
are summed; after the solve ``‖Y − X̃F‖² = A − 2⟨V, Δ⟩ + ⟨Δ, G₆₄Δ⟩`` with ``Δ = F − F₀`` (exact algebra, every
term of the size of the error itself: it matches the residual computed row by row to ~1e-8 relative). Until
``F₀`` exists the rows are kept (copied): fewer than ``2·d`` rows. On the held-out batches (``heldout=``) the
error is computed row by row after the solve (exact, rows not held).

Bad input raises ``ValueError`` naming the module: a name that does not exist, an output that is not
one tensor, feature sizes that change between batches, NaN/inf activations, no rows; fewer rows than
``K + 1`` warns (:class:`UnderdeterminedFitWarning`).
"""
from __future__ import annotations

import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from pyfastpeft.core.amp import autocast_off
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.core.table import table
from pyfastpeft.subtractive.modules import FilterBlock
from pyfastpeft.subtractive.gram_accumulate import gram_accumulate

__all__ = ["fit", "rank_modules", "ModuleFit", "FitReport", "UnderdeterminedFitWarning", "SingularFitWarning",
           "gram_accumulate"]

METHODS = ("ridge", "pinv")


class UnderdeterminedFitWarning(UserWarning):
    """Fewer calibration rows than features (``K + 1``): many solutions fit; ridge/pinv picks one."""


class SingularFitWarning(UserWarning):
    """``G`` is singular without ridge: the solve fell back to the pseudo-inverse."""


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
@dataclass
class ModuleFit:
    """What was fitted for one module."""

    name: str
    module_type: str
    in_features: int
    out_features: int
    feature_dim: int
    rows: int
    fit_error: float  # relative, calibration rows
    heldout_error: Optional[float]  # relative, held-out rows (None without heldout=)
    heldout_rows: int
    params_before: int
    params_after: int
    kind: str  # "full" | "lowrank" | "diagonal"
    method: str
    ridge: float
    rank: Optional[int]
    replaced: bool = False
    notes: list = field(default_factory=list)

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def error(self) -> float:
        """The error used for ranking: held-out if measured, else calibration."""
        return self.heldout_error if self.heldout_error is not None else self.fit_error

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params_saved"] = self.params_saved
        return d


class FitReport(list):
    """A list of :class:`ModuleFit` with a table (``str(report)``) and totals."""

    @property
    def params_saved(self) -> int:
        return sum(m.params_saved for m in self)

    def by_name(self) -> dict:
        return {m.name: m for m in self}

    def to_dict(self) -> list:
        return [m.to_dict() for m in self]

    def table(self) -> str:
        head = ["module", "type", "K->N", "rows", "fit err", "held-out err", "params before", "after", "saved",
                "block"]
        rows = []
        for m in self:
            block = m.kind + (f" r{m.rank}" if m.rank else "")
            ho = "-" if m.heldout_error is None else f"{m.heldout_error:.3e}"
            rows.append([m.name, m.module_type, f"{m.in_features}->{m.out_features}", str(m.rows),
                         f"{m.fit_error:.3e}", ho, str(m.params_before), str(m.params_after), str(m.params_saved),
                         block])
        return table(head, rows)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------------
# resolving modules
# ----------------------------------------------------------------------------------------------------
def _resolve_names(model: nn.Module, modules, where: str) -> list[str]:
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, (list, tuple)) or not modules:
        raise ValueError(f"{where}: modules must be a module name or a non-empty list of names, got {modules!r}")
    named = dict(model.named_modules())
    out = []
    for n in modules:
        if not isinstance(n, str) or not n:
            raise ValueError(f"{where}: module names must be non-empty strings, got {n!r}")
        if n not in named:
            raise ValueError(f"{where}: module {n!r} does not exist in the model "
                             f"(names are those of model.named_modules(), e.g. {_examples(named)})")
        if n not in out:
            out.append(n)
    for a in out:
        for b in out:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"{where}: module {b!r} is inside module {a!r}: replace one or the other")
    return out


def _examples(named: dict) -> str:
    names = [n for n in named if n][:3]
    return ", ".join(repr(n) for n in names) or "none"


def _match_candidates(model: nn.Module, candidates) -> list[str]:
    """Names matching ``candidates``: a module name, a regex (full match), a module class, or a list of these."""
    if isinstance(candidates, (str, type)):
        candidates = [candidates]
    if not isinstance(candidates, (list, tuple)) or not candidates:
        raise ValueError("rank_modules: candidates must be a name, a regex, a module class, or a non-empty list "
                         f"of these, got {candidates!r}")
    named = [(n, m) for n, m in model.named_modules() if n]
    out: list[str] = []
    for c in candidates:
        if isinstance(c, type) and issubclass(c, nn.Module):
            hits = [n for n, m in named if isinstance(m, c)]
        elif isinstance(c, str):
            if any(n == c for n, _ in named):
                hits = [c]
            else:
                try:
                    rx = re.compile(c)
                except re.error as e:
                    raise ValueError(f"rank_modules: candidate {c!r} is neither a module name nor a valid regex "
                                     f"({e})") from None
                hits = [n for n, _ in named if rx.fullmatch(n)]
        else:
            raise ValueError(f"rank_modules: candidate {c!r} must be a name, a regex or an nn.Module class")
        if not hits:
            raise ValueError(f"rank_modules: candidate {c!r} matches no module of the model")
        out += [h for h in hits if h not in out]
    return out


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
REF_ROWS = 2  # the reference solution F₀ of the calibration error is solved once rows >= REF_ROWS * d
RESID_BLOCK = 8192  # rows per fp64 block of the residual against F₀ (bounds the fp64 copies)


class _Stats:
    """Streaming sums for one module: G, C (fp64 sums of the fp32 batch statistics: the solve's), Σ‖y‖², rows,
    the shapes seen, and the fp64 sums against a reference solution ``F₀`` (``A``, ``V``, ``G64``, ``YY``) that
    give the calibration error without cancellation (:func:`_calib_error`)."""

    def __init__(self, name: str, bias: bool, feature_dim: Optional[int],
                 ref_solve: Optional[Callable[["_Stats"], Tensor]] = None):
        self.name, self.bias, self.feature_dim_arg = name, bias, feature_dim
        self.G: Optional[Tensor] = None
        self.C: Optional[Tensor] = None
        self.yy = 0.0
        self.rows = 0
        self.K = self.N = None
        self.feature_dim = None
        self.dtype = self.device = None
        self.calls = 0
        # calibration error (docs/subtractive.md §1): residual against F₀, fp64
        self.ref_solve = ref_solve
        self.F0: Optional[Tensor] = None
        self.A: Optional[Tensor] = None  # Σ ‖Y − X̃F₀‖² (0-d, on the statistics' device: no sync per batch)
        self.V: Optional[Tensor] = None  # X̃ᵀ(Y − X̃F₀)
        self.G64: Optional[Tensor] = None  # X̃ᵀX̃ summed in fp64 from the rows (the solve's G is fp32 per batch)
        self.YY: Optional[Tensor] = None  # ‖Y‖² in fp64 (yy above is summed in the activations' precision)
        self.pending: list = []  # rows (copies) seen before F₀ exists
        self.pending_rows = 0
        # held-out (computed after the solve, from F)
        self.F: Optional[Tensor] = None
        self.ho_err2 = 0.0
        self.ho_yy = 0.0
        self.ho_rows = 0

    def rows_of(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Flatten one call's input and output into ``(rows, K)`` and ``(rows, N)``."""
        fd = self.feature_dim_arg
        if fd is None:
            fd = 1 if x.dim() == 4 else -1
        if fd == 1 and x.dim() < 3:
            fd = -1
        if self.feature_dim is None:
            self.feature_dim = fd
        if fd == 1:
            if y.dim() != x.dim() or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"module {self.name!r}: output shape {tuple(y.shape)} does not keep the input's "
                                 f"batch and spatial shape {tuple(x.shape)}: a filter block maps each position "
                                 "(channels as features)")
            x2 = x.movedim(1, -1).reshape(-1, x.shape[1])
            y2 = y.movedim(1, -1).reshape(-1, y.shape[1])
        else:
            if x.dim() < 1 or y.dim() < 1 or x.shape[:-1] != y.shape[:-1]:
                raise ValueError(f"module {self.name!r}: output shape {tuple(y.shape)} does not keep the input's "
                                 f"leading dims {tuple(x.shape)}: a filter block maps each row (..., K) -> (..., N)")
            x2 = x.reshape(-1, x.shape[-1])
            y2 = y.reshape(-1, y.shape[-1])
        K, N = x2.shape[1], y2.shape[1]
        if self.K is None:
            self.K, self.N = K, N
            self.dtype, self.device = y.dtype, y.device
        elif (K, N) != (self.K, self.N):
            raise ValueError(f"module {self.name!r}: feature sizes changed between batches: in/out features "
                             f"{self.K}/{self.N} before, {K}/{N} now")
        return x2, y2

    def add(self, x: Tensor, y: Tensor, backend: Optional[str]) -> None:
        x2, y2 = self.rows_of(x, y)
        if x2.dtype != y2.dtype:  # e.g. under autocast: the wider dtype, so neither side is rounded
            dt = torch.promote_types(x2.dtype, y2.dtype)
            x2, y2 = x2.to(dt), y2.to(dt)
        g, c = gram_accumulate(x2, y2, bias=self.bias, backend=backend)
        # NaN/inf in the rows reach the sums; one fp64 total per matrix tells (a finite fp32 matrix cannot
        # overflow an fp64 sum), without a boolean copy of G
        if not math.isfinite(float(g.sum(dtype=torch.float64))):
            raise ValueError(f"module {self.name!r}: its input holds NaN or inf values (or overflows fp32 sums)")
        # ‖Y‖² from a norm in the activations' dtype (no fp64 copy of Y): relative error ~u, the same order as
        # the fp32 statistics' own
        nd = acc_dtype(y2.dtype)  # fp16 norms would overflow
        yy = float(torch.linalg.vector_norm(y2, dtype=nd)) ** 2
        if not (math.isfinite(float(c.sum(dtype=torch.float64))) and math.isfinite(yy)):
            raise ValueError(f"module {self.name!r}: its output holds NaN or inf values (or overflows fp32 sums)")
        if self.G is None:
            self.G, self.C = g.double(), c.double()
        else:  # fp64 between batches; in place, no fp64 copy of each batch's statistics
            self.G.add_(g)
            self.C.add_(c)
        self.yy += yy
        self.rows += x2.shape[0]
        self._add_residual_rows(x2, y2)

    # ------------------------------------------------------------------ calibration error without cancellation
    def _add_residual_rows(self, x2: Tensor, y2: Tensor) -> None:
        if self.F0 is not None:
            self._residual(x2, y2)
            return
        d = self.K + (1 if self.bias else 0)
        if self.pending_rows + x2.shape[0] >= REF_ROWS * d:
            self._set_reference()  # from the statistics so far, this batch included
            self._residual(x2, y2)
        else:  # copies: the model may change its activations in place after the hook (ReLU(inplace=True))
            self.pending.append((x2.clone(), y2.clone()))
            self.pending_rows += x2.shape[0]

    def _set_reference(self) -> None:
        """``F₀``: the fit's full solve on the statistics so far (zeros if that fails; the error stays exact in
        algebra, only its rounding grows with ``‖X̃(F − F₀)‖``), then the residual of the rows kept until now."""
        F0 = None
        if self.ref_solve is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    F0 = self.ref_solve(self)
            except (ValueError, RuntimeError):
                F0 = None
        if F0 is None or not bool(torch.isfinite(F0).all()):
            F0 = torch.zeros_like(self.C)
        self.F0 = F0
        self.A = torch.zeros((), dtype=torch.float64, device=F0.device)
        self.V = torch.zeros_like(F0)
        self.G64 = torch.zeros_like(self.G)
        self.YY = torch.zeros((), dtype=torch.float64, device=F0.device)
        pending, self.pending, self.pending_rows = self.pending, [], 0
        for xp, yp in pending:
            self._residual(xp, yp)

    def _residual(self, x2: Tensor, y2: Tensor) -> None:
        """``A += ‖Y − X̃F₀‖²``, ``V += X̃ᵀ(Y − X̃F₀)``, ``G64 += X̃ᵀX̃``, ``YY += ‖Y‖²``, all in fp64, by blocks."""
        K, F0, G64 = self.K, self.F0, self.G64
        W0 = F0[:K]
        for m0 in range(0, x2.shape[0], RESID_BLOCK):
            xd = x2[m0:m0 + RESID_BLOCK].to(device=F0.device, dtype=torch.float64)
            yd = y2[m0:m0 + RESID_BLOCK].to(device=F0.device, dtype=torch.float64)
            self.YY += torch.linalg.vector_norm(yd) ** 2
            r = yd - xd @ W0
            if self.bias:
                r -= F0[K]
            self.A += torch.linalg.vector_norm(r) ** 2
            self.V[:K].addmm_(xd.t(), r)
            G64[:K, :K].addmm_(xd.t(), xd)
            if self.bias:
                self.V[K] += r.sum(0)
                sx = xd.sum(0)
                G64[K, :K] += sx
                G64[:K, K] += sx
                G64[K, K] += xd.shape[0]

    def finish(self) -> None:
        """End of the calibration pass: form ``F₀`` now if fewer than ``2·d`` rows came."""
        if self.F0 is None and self.rows > 0:
            self._set_reference()

    def add_heldout(self, x: Tensor, y: Tensor) -> None:
        x2, y2 = self.rows_of(x, y)
        xd, yd = x2.double(), y2.double()
        if not (torch.isfinite(xd).all() and torch.isfinite(yd).all()):
            raise ValueError(f"module {self.name!r}: held-out activations hold NaN or inf values")
        F = self.F.to(xd.device)
        pred = xd @ F[:self.K]
        if self.bias:
            pred += F[self.K]
        self.ho_err2 += float((yd - pred).pow(2).sum())
        self.ho_yy += float(yd.pow(2).sum())
        self.ho_rows += x2.shape[0]


def _first_tensor(args: tuple, kwargs: dict) -> Optional[Tensor]:
    for a in args:
        if isinstance(a, Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, Tensor):
            return a
    return None


def _install_hooks(model: nn.Module, stats: dict, on_rows: Callable[[_Stats, Tensor, Tensor], None]) -> list:
    handles = []
    for name, st in stats.items():
        mod = model.get_submodule(name)

        def hook(mod, args, kwargs, out, st=st):
            x = _first_tensor(args, kwargs)
            if x is None:
                raise ValueError(f"module {st.name!r}: was called without a tensor input")
            if not isinstance(out, Tensor):
                raise ValueError(f"module {st.name!r}: its output is a {type(out).__name__}, not one tensor; a "
                                 "filter block can only replace a module that returns a single tensor")
            if not (x.is_floating_point() and out.is_floating_point()):
                raise ValueError(f"module {st.name!r}: input and output must be floating tensors, got "
                                 f"{x.dtype} -> {out.dtype}")
            st.calls += 1
            # the model runs under the caller's autocast; the statistics (fp32 sums, fp64 solves) never do
            with autocast_off(x.device.type):
                on_rows(st, x.detach(), out.detach())

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return handles


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _to_device(batch, device):
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch) if not hasattr(batch, "_fields") else \
            type(batch)(*(_to_device(v, device) for v in batch))
    return batch


def _default_forward(model: nn.Module, batch) -> Any:
    """A tensor -> ``model(batch)``; a dict -> ``model(**batch)``; a (inputs, labels...) tuple/list ->
    ``model(batch[0])`` (a DataLoader's ``(x, y)`` pairs)."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise ValueError(f"data: cannot feed a batch of type {type(batch).__name__} to the model; pass forward="
                     "lambda model, batch: ... to say how")


class _Progress:
    """tqdm when installed (and enabled), else a one-line counter on stderr."""

    def __init__(self, desc: str, total: Optional[int], enabled: bool):
        self.enabled, self.desc, self.total, self.n = enabled, desc, total, 0
        self.bar = None
        self.t0 = time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False)
            except ImportError:
                self.bar = None

    def update(self, rows: int) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(rows=rows, refresh=False)
        else:
            tot = f"/{self.total}" if self.total else ""
            rate = rows / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r{self.desc}: {self.n}{tot} batches, {rows} rows ({rate:,.0f} rows/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def _run_pass(model, data, forward, stats, on_rows, desc, progress, max_batches) -> int:
    device = _model_device(model)
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    enabled = progress if progress is not None else sys.stderr.isatty()
    bar = _Progress(desc, total, enabled)
    handles = _install_hooks(model, stats, on_rows)
    n = 0
    try:
        for batch in data:
            if max_batches is not None and n >= max_batches:
                break
            forward(model, _to_device(batch, device))
            n += 1
            bar.update(max((s.rows for s in stats.values()), default=0))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return n


def _collect(model: nn.Module, names: Sequence[str], data, *, bias: bool, feature_dim, forward, backend,
             progress, max_batches, where: str, ref_solve: Optional[Callable] = None) -> dict:
    if data is None:
        raise ValueError(f"{where}: data is None; pass a DataLoader or an iterable of batches")
    stats = {n: _Stats(n, bias, feature_dim, ref_solve) for n in names}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _run_pass(model, data, forward or _default_forward, stats,
                      lambda st, x, y: st.add(x, y, backend), where + " (calibration)", progress, max_batches)
    finally:
        for m, t in modes.items():
            m.train(t)
    for st in stats.values():
        if st.rows == 0:
            why = "the data gave no batches" if st.calls == 0 else "its calls had no rows"
            raise ValueError(f"module {st.name!r}: saw no calibration rows ({why}; is the module used in the "
                             "model's forward?)")
    for st in stats.values():
        st.finish()
    return stats


# ----------------------------------------------------------------------------------------------------
# solving
# ----------------------------------------------------------------------------------------------------
def _default_rcond(dtype: torch.dtype, d: int) -> float:
    eps = torch.finfo(acc_dtype(dtype)).eps
    return d * eps


def _pinv_solve(G: Tensor, C: Tensor, rcond: float) -> Tensor:
    w, V = torch.linalg.eigh(G)
    keep = w > rcond * max(float(w.max()), 0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    return V @ (inv[:, None] * (V.t() @ C))


def _ridge_solve(G: Tensor, C: Tensor, ridge: float, rcond: float, st: _Stats) -> Tensor:
    d = G.shape[0]
    lam = ridge * float(torch.diagonal(G).sum()) / d
    A = G + lam * torch.eye(d, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(C, L)
    msg = f"module {st.name!r}: G is singular" + (" without ridge" if ridge == 0 else f" even with ridge={ridge}") + \
        ": solved with the pseudo-inverse instead"
    warnings.warn(msg, SingularFitWarning, stacklevel=4)
    return _pinv_solve(A, C, rcond)


def _centered(st: _Stats) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Centred Gram ``Σ_c (K, K)``, cross ``C_c (K, N)``, means x̄, ȳ, row count (bias column needed)."""
    K, G, C = st.K, st.G, st.C
    n = float(G[K, K])
    xm = G[K, :K] / n
    ym = C[K] / n
    Gc = G[:K, :K] - n * torch.outer(xm, xm)
    Cc = C[:K] - n * torch.outer(xm, ym)
    return Gc, Cc, xm, ym, n


def _solve(st: _Stats, *, ridge: float, method: str, rank: Optional[int], diagonal: bool,
           rcond: Optional[float]) -> dict:
    """Solution for one module: ``F ((K+1) or K, N)`` in fp64 plus what the block stores."""
    K, N, G, C = st.K, st.N, st.G, st.C
    d = G.shape[0]
    rc = rcond if rcond is not None else _default_rcond(st.dtype, d)
    if diagonal:
        if K != N:
            raise ValueError(f"module {st.name!r}: diagonal=True needs in_features == out_features, got {K} -> {N}")
        if st.bias:
            Gc, Cc, xm, ym, n = _centered(st)
            sxx, sxy = torch.diagonal(Gc), torch.diagonal(Cc)
        else:
            sxx, sxy = torch.diagonal(G), torch.diagonal(C)
        lam = ridge * float(sxx.sum()) / K
        denom = sxx + lam
        s = torch.where(denom > 0, sxy / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(sxy))
        F = torch.diag(s)
        b = (ym - xm * s) if st.bias else None
        if b is not None:
            F = torch.cat([F, b[None]], 0)
        return dict(F=F, scale=s, bias=b)
    if method == "pinv":
        F = _pinv_solve(G, C, rc)
    else:
        F = _ridge_solve(G, C, ridge, rc, st)
    if rank is None or rank >= min(K, N):
        return dict(F=F, weight=F[:K].t(), bias=F[K] if st.bias else None)
    # reduced-rank regression in the data's metric (the bias stays full: b = ȳ − x̄ W)
    W = F[:K]
    if st.bias:
        Gc, _, xm, ym, n = _centered(st)
    else:
        Gc, xm, ym = G, None, None
    lam = ridge * float(torch.diagonal(Gc).sum()) / K
    w, V = torch.linalg.eigh(Gc + lam * torch.eye(K, dtype=G.dtype, device=G.device))
    keep = w > rc * max(float(w.max()), 0.0)
    sq = torch.sqrt(torch.clamp(w, min=0.0))
    inv_sq = torch.where(keep, 1.0 / torch.where(keep, sq, torch.ones_like(sq)), torch.zeros_like(sq))
    S = V @ (sq[:, None] * V.t())
    S_inv = V @ (inv_sq[:, None] * V.t())
    U, sig, Vh = torch.linalg.svd(S @ W, full_matrices=False)
    down = S_inv @ (U[:, :rank] * sig[:rank])  # (K, k)
    up = Vh[:rank]  # (k, N)
    Wk = down @ up
    b = (ym - xm @ Wk) if st.bias else None
    F = torch.cat([Wk, b[None]], 0) if st.bias else Wk
    return dict(F=F, down=down.t(), up=up.t(), bias=b)


def _calib_error(st: _Stats, F: Tensor) -> float:
    """``‖Y − X̃F‖ / ‖Y‖`` on the calibration rows: ``A − 2⟨V, Δ⟩ + ⟨Δ, G₆₄Δ⟩`` with ``Δ = F − F₀`` (``A``, ``V``,
    ``G₆₄`` the fp64 sums of :class:`_Stats`). Exact algebra in which no term is of the size of ``‖Y‖²`` (the
    cancellation of ``‖Y‖² − 2⟨F, C⟩ + ⟨F, GF⟩``), and ``G₆₄`` is the rows' fp64 Gram, not the solve's fp32 one,
    whose rounding (``eps_fp32·‖G‖``) swamps ``⟨Δ, GΔ⟩`` in the weak directions of ill-conditioned inputs."""
    D = F.to(st.F0.device) - st.F0
    e2 = float(st.A) - 2.0 * float((D * st.V).sum()) + float((D * (st.G64 @ D)).sum())
    yy = float(st.YY)
    return math.sqrt(max(e2, 0.0) / yy) if yy > 0 else (0.0 if e2 <= 0 else math.inf)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _block_params(K: int, N: int, rank: Optional[int], diagonal: bool, bias: bool) -> int:
    if diagonal:
        core = K
    elif rank is not None and rank < min(K, N):
        core = rank * (K + N)
    else:
        core = K * N
    return core + (N if bias else 0)


def _check_options(ridge, method, rank, diagonal, rcond, feature_dim, where):
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{where}: ridge must be a finite number >= 0, got {ridge!r}")
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{where}: rank must be None or a positive int, got {rank!r}")
    if diagonal and rank is not None:
        raise ValueError(f"{where}: diagonal=True and rank are exclusive")
    if rcond is not None and not (isinstance(rcond, (int, float)) and 0 <= rcond < 1):
        raise ValueError(f"{where}: rcond must be None or a number in [0, 1), got {rcond!r}")
    if feature_dim not in (None, -1, 1):
        raise ValueError(f"{where}: feature_dim must be None (auto: channels of 4-D maps), -1 or 1, "
                         f"got {feature_dim!r}")


def _fit_all(model, names, data, *, ridge, method, rank, diagonal, bias, rcond, heldout, feature_dim, forward,
             backend, progress, max_batches, where) -> tuple[FitReport, dict, dict]:
    _check_options(ridge, method, rank, diagonal, rcond, feature_dim, where)

    def ref_solve(st: _Stats) -> Tensor:  # F₀ of the calibration error: a full solve (docs §1)
        return _solve(st, ridge=ridge, method=method, rank=None, diagonal=False, rcond=rcond)["F"]

    stats = _collect(model, names, data, bias=bias, feature_dim=feature_dim, forward=forward, backend=backend,
                     progress=progress, max_batches=max_batches, where=where, ref_solve=ref_solve)
    sols = {}
    report = FitReport()
    for name in names:
        st = stats[name]
        mod = model.get_submodule(name)
        notes = []
        d = st.K + (1 if bias else 0)
        if st.rows < d:
            msg = (f"module {name!r}: {st.rows} calibration rows < {d} features (in_features"
                   f"{' + 1 bias column' if bias else ''}): the fit is underdetermined")
            warnings.warn(msg, UnderdeterminedFitWarning, stacklevel=3)
            notes.append("underdetermined")
        if diagonal and st.K != st.N:
            raise ValueError(f"module {name!r}: diagonal=True needs in_features == out_features, "
                             f"got {st.K} -> {st.N}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SingularFitWarning)
            sol = _solve(st, ridge=ridge, method=method, rank=rank, diagonal=diagonal, rcond=rcond)
        for w in caught:
            notes.append("singular: pinv fallback")
            warnings.warn(w.message, w.category, stacklevel=3)
        st.F = sol["F"]
        sols[name] = sol
        eff_rank = rank if (rank is not None and rank < min(st.K, st.N)) else None
        kind = "diagonal" if diagonal else ("lowrank" if eff_rank is not None else "full")
        report.append(ModuleFit(
            name=name, module_type=type(mod).__name__, in_features=st.K, out_features=st.N,
            feature_dim=st.feature_dim, rows=st.rows, fit_error=_calib_error(st, st.F), heldout_error=None,
            heldout_rows=0, params_before=_params(mod),
            params_after=_block_params(st.K, st.N, eff_rank, diagonal, bias), kind=kind, method=method,
            ridge=float(ridge), rank=eff_rank, notes=notes))
    if heldout is not None:
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                _run_pass(model, heldout, forward or _default_forward, stats, lambda st, x, y: st.add_heldout(x, y),
                          where + " (held-out)", progress, None)
        finally:
            for m, t in modes.items():
                m.train(t)
        for r in report:
            st = stats[r.name]
            if st.ho_rows == 0:
                raise ValueError(f"module {r.name!r}: saw no held-out rows (is heldout empty?)")
            r.heldout_rows = st.ho_rows
            r.heldout_error = math.sqrt(st.ho_err2 / st.ho_yy) if st.ho_yy > 0 else 0.0
    return report, sols, stats


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------
def fit(model: nn.Module, modules: Union[str, Sequence[str]], data: Iterable, *, ridge: float = 1e-4,
        rank: Optional[int] = None, method: str = "ridge", diagonal: bool = False, bias: bool = True,
        rcond: Optional[float] = None, heldout: Optional[Iterable] = None, feature_dim: Optional[int] = None,
        freeze: bool = True, trainable: Sequence[str] = (), forward: Optional[Callable] = None,
        backend: Optional[str] = None, progress: Optional[bool] = None,
        max_batches: Optional[int] = None) -> FitReport:
    """Fit a filter block to each of ``modules`` on ``data`` and put it in the module's place.

    Args:
        model: any ``nn.Module``; changed in place.
        modules: a name of ``model.named_modules()`` or a list of names (none inside another). Each maps
            ``(..., K)`` to ``(..., N)`` (same leading dims), or ``(B, C, H, W)`` to ``(B, C', H, W)``.
        data: a DataLoader or any iterable of batches; a batch is a tensor (``model(batch)``), a dict
            (``model(**batch)``) or a tuple/list whose first item is the input (``(x, y)`` pairs). Tensors
            are moved to the model's device. ``forward(model, batch)`` overrides how a batch is run.
        ridge: ``λ`` of ``(G + λ·tr(G)/d·I) F = C``; 0 for plain least squares (singular ``G`` then falls
            back to ``pinv`` with a warning).
        rank: ``None`` (full ``N x K`` block) or ``k``: a low-rank block ``W_up W_down`` fitted in the
            data's metric (reduced-rank regression); ``k >= min(K, N)`` gives a full block.
        method: ``"ridge"`` (default) or ``"pinv"`` (eigen-decomposition, ``rcond`` cut-off).
        diagonal: per-feature scale and bias only (``K == N``).
        bias: fit a bias (the ``X̃ = [X, 1]`` column).
        rcond: eigenvalue cut-off of ``pinv`` relative to the largest (default ``d·eps`` of the statistics).
        heldout: optional iterable of batches for the held-out error (a second pass, after the solve).
        feature_dim: ``None`` (auto: channels of 4-D maps, the last dim otherwise), ``-1`` or ``1``.
        freeze: set ``requires_grad=False`` on every parameter except the filter blocks' and the
            ``trainable`` modules' (the usual SFP setup: only the blocks, and a new head, train).
        trainable: names (or name prefixes) of modules whose parameters stay trainable, e.g. ``["head"]``;
            with ``freeze`` they become the model's ``modules_to_save`` (written by ``pfp.save_adapter``).
        backend: backend of the accumulation op (``"triton" | "torch" | None``).
        progress: show a progress bar (tqdm if installed, else a line on stderr); default: when stderr
            is a terminal.
        max_batches: stop after this many calibration batches.

    Returns:
        :class:`FitReport`, one :class:`ModuleFit` per module (fit and held-out error, rows, parameters
        before and after). The model's train/eval mode is as before for every module (the fit itself ran
        in eval mode under ``torch.no_grad()``); each block takes the replaced module's mode.

    Raises:
        ValueError: naming the module, for a name that does not exist, an output that is not one tensor,
            feature sizes that change between batches, NaN/inf activations, or no data. Nothing is
            replaced when the fit fails.
    """
    names = _resolve_names(model, modules, "fit")
    if isinstance(trainable, str):
        trainable = [trainable]
    named = dict(model.named_modules())
    for t in trainable:
        if not any(n == t or n.startswith(t + ".") for n in named):
            raise ValueError(f"fit: trainable module {t!r} does not exist in the model")
    report, sols, stats = _fit_all(model, names, data, ridge=ridge, method=method, rank=rank, diagonal=diagonal,
                                   bias=bias, rcond=rcond, heldout=heldout, feature_dim=feature_dim, forward=forward,
                                   backend=backend, progress=progress, max_batches=max_batches, where="fit")
    blocks = []
    for r in report:
        st, sol = stats[r.name], sols[r.name]
        old = model.get_submodule(r.name)
        ref = next(iter(old.parameters()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else st.dtype
        device = ref.device if ref is not None else st.device
        blk = FilterBlock(st.K, st.N, rank=r.rank, diagonal=diagonal, bias=bias, feature_dim=st.feature_dim,
                          source=type(old).__name__, device=device, dtype=dtype)
        blk.load_solution(sol.get("weight"), sol.get("bias"), down=sol.get("down"), up=sol.get("up"),
                          scale=sol.get("scale"))
        blk.train(old.training)
        _set_submodule(model, r.name, blk)
        r.replaced = True
        r.params_after = _params(blk)
        blocks.append(blk)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in trainable:
            for n, m in model.named_modules():
                if n == t or n.startswith(t + "."):
                    for p in m.parameters():
                        p.requires_grad_(True)
        for blk in blocks:
            for p in blk.parameters():
                p.requires_grad_(True)
        if trainable:  # they train fully: pfp.save_adapter writes them with the blocks (PEFT's modules_to_save)
            from pyfastpeft.surgery.injection import _set_modules_to_save

            named = dict(model.named_modules())
            keep = [n for n in named if n and any(n == t or (n.startswith(t + ".") and t not in named)
                                                  for t in trainable)]
            _set_modules_to_save(model, [n for n in keep if not any(n.startswith(o + ".") for o in keep)])
    return report


def rank_modules(model: nn.Module, data: Iterable, candidates, *, top_k: Optional[int] = None,
                 ridge: float = 1e-4, rank: Optional[int] = None, method: str = "ridge", diagonal: bool = False,
                 bias: bool = True, rcond: Optional[float] = None, heldout: Optional[Iterable] = None,
                 feature_dim: Optional[int] = None, forward: Optional[Callable] = None,
                 backend: Optional[str] = None, progress: Optional[bool] = None,
                 max_batches: Optional[int] = None) -> FitReport:
    """Fit every candidate module in one pass over ``data``; sorted by fit error (held-out if given).

    Args:
        candidates: a module name, a regex matched against whole names (``r"blocks\\.\\d+\\.mlp"``), an
            ``nn.Module`` subclass (every instance), or a list of these.
        top_k: keep the ``k`` best.
        Other arguments as :func:`fit`.

    Returns:
        :class:`FitReport` sorted by ``error`` (lowest first: the most redundant modules), ties by larger
        ``params_saved``, then by name (deterministic whatever the candidates' order). The model is not
        changed (modes restored, nothing replaced or frozen).
    """
    names = _match_candidates(model, candidates)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"rank_modules: top_k must be None or a positive int, got {top_k!r}")
    report, _, _ = _fit_all(model, names, data, ridge=ridge, method=method, rank=rank, diagonal=diagonal, bias=bias,
                            rcond=rcond, heldout=heldout, feature_dim=feature_dim, forward=forward, backend=backend,
                            progress=progress, max_batches=max_batches, where="rank_modules")
    out = FitReport(sorted(report, key=lambda m: (m.error, -m.params_saved, m.name)))
    return FitReport(out[:top_k]) if top_k is not None else out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
