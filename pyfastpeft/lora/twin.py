"""First-use twin checks of the LoRA family's CUDA ops (the framework and the error measure: :mod:`pyfastpeft.core.twin`)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pyfastpeft.core.twin import DTYPES, _norm_err, _randn


def check_lora_shrink(device: torch.device, op: Optional[Callable] = None) -> float:
    """``u = x @ a.T`` (x (M, K), a (R, K)) against float64, fp32/fp16/bf16, odd shapes.

    Cases: the odd LoRA case M=37, K=120, R=3; R=40 > 32 (several rank chunks) with x a column slice
    (row stride K+7); R=17 with x transposed (stride(1) != 1, copied by the op); M=0 must give (0, R).
    """
    op = op if op is not None else torch.ops.pyfastpeft_C.lora_shrink
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    for M, K, R, layout in ((37, 120, 3, "contiguous"), (19, 300, 40, "row-sliced"),
                            (5, 64, 17, "transposed"), (0, 24, 5, "contiguous")):
        x64 = _randn(gen, M, K)
        a64 = _randn(gen, R, K)
        for dtype in DTYPES:
            x_lo, a_lo = x64.to(dtype), a64.to(dtype)  # the reference uses the rounded inputs
            ref = x_lo.double() @ a_lo.double().T
            if layout == "row-sliced":
                x = torch.zeros(M, K + 7, dtype=dtype, device=device)
                x[:, :K] = x_lo.to(device)
                x = x[:, :K]
            elif layout == "transposed":
                x = x_lo.T.contiguous().to(device).T
            else:
                x = x_lo.to(device)
            u = op(x, a_lo.to(device))
            if tuple(u.shape) != (M, R) or u.dtype != dtype:
                return math.inf
            worst = max(worst, _norm_err(u, ref, dtype, K))
    return worst


def check_lora_expand_add_(device: torch.device, op: Optional[Callable] = None) -> float:
    """``y += scale * u @ b.T`` in place (y (M, N), u (M, R), b (N, R)) against float64.

    y is always a column slice of a wider buffer whose extra columns hold a sentinel: a kernel that
    writes past column N (or ignores the row stride) scores ``inf``. Cases: M=37, N=72, R=3;
    M=40, N=200, R=40 (several row, column and rank tiles); M=1, N=5, R=1.
    """
    op = op if op is not None else torch.ops.pyfastpeft_C.lora_expand_add_
    gen = torch.Generator().manual_seed(4321)
    worst = 0.0
    pad = 5
    for M, N, R, scale in ((37, 72, 3, 0.75), (40, 200, 40, -0.5), (1, 5, 1, 2.0)):
        y64, u64, b64 = _randn(gen, M, N), _randn(gen, M, R), _randn(gen, N, R)
        for dtype in DTYPES:
            y_lo, u_lo, b_lo = y64.to(dtype), u64.to(dtype), b64.to(dtype)
            ref = y_lo.double() + scale * (u_lo.double() @ b_lo.double().T)
            buf = torch.full((M, N + pad), 12345.0, dtype=dtype, device=device)
            buf[:, :N] = y_lo.to(device)
            y = buf[:, :N]
            op(y, u_lo.to(device), b_lo.to(device), scale)
            if not bool((buf[:, N:].cpu() == 12345.0).all()):
                return math.inf
            worst = max(worst, _norm_err(y, ref, dtype, R + 1))
    return worst


def check_gated_gate(device: torch.device, op: Optional[Callable] = None) -> float:
    """Token-selective gate ``(ratio, selected, index, count)`` against float64: ``ratio`` scored like the
    other outputs (L = R²), and the discrete outputs exactly: ``selected == (ratio_out >= max(τ, 0))`` on the
    op's own ratios (so rounding at the threshold cannot fail it), ``index[:count]`` the selected rows in
    increasing order. A wrong flag, index or count scores ``inf``. Cases: M=37, R=3, G=2 with τ at the median
    (ties: τ equal to one row's ratio); M=2100 (three scan chunks of 1024), R=40, G=1, τ at the 30 % quantile;
    τ < 0 (all selected); M=0; rows with a NaN in ``u`` or ``hsq`` (ratio NaN, never selected: ``_gate_nan_rows``)."""
    op = op if op is not None else torch.ops.pyfastpeft_C.gated_gate
    gen = torch.Generator().manual_seed(2468)
    worst = 0.0
    for M, R, G, q in ((37, 3, 2, 0.5), (2100, 40, 1, 0.3), (64, 16, 3, -1.0), (0, 8, 1, 0.5)):
        u64, b64 = _randn(gen, M, R), _randn(gen, 50, R)
        hsq = torch.rand(G, M, generator=gen, dtype=torch.float64).float() + 0.05
        for dtype in DTYPES:
            u_lo = u64.to(dtype)
            gram = (b64.T @ b64).float()
            ref = 0.5 * ((u_lo.double() @ gram.double()) * u_lo.double()).sum(1).sqrt() / hsq.double().sum(0).sqrt()
            taus = [torch.tensor(-1.0 if q < 0 or M == 0 else float(ref.float().quantile(q)))]
            for tau in taus:
                ratio, sel, index, count = op(u_lo.to(device), gram.to(device), hsq.to(device), tau.to(device), 0.5)
                if tuple(ratio.shape) != (M,) or ratio.dtype != torch.float32 or sel.dtype != torch.bool:
                    return math.inf
                ratio_c, sel_c, n = ratio.cpu(), sel.cpu(), int(count.cpu()[0])
                want = torch.nonzero(ratio_c >= tau.clamp(min=0)).flatten()
                if not torch.equal(sel_c, ratio_c >= tau.clamp(min=0)) or n != want.numel() or \
                        not torch.equal(index.cpu()[:n].long(), want):
                    return math.inf
                worst = max(worst, _norm_err(ratio, ref, dtype, R * R))
                if len(taus) == 1 and q == 0.5 and M:  # again with τ equal to a row's own ratio: the tie selects
                    taus.append(ratio_c[M // 2].clone())
    return max(worst, _gate_nan_rows(device, op, gen))


def _gate_nan_rows(device: torch.device, op: Callable, gen: torch.Generator) -> float:
    """A row with a NaN in ``u`` and one with a NaN in ``hsq`` must get ratio NaN and not be selected, also at
    τ = 0, where a max that drops NaN (``fmaxf``) would give them ratio 0 and select them; the other rows are
    finite, flagged ``ratio >= 0`` and compacted as usual. 0 if so, else ``inf``."""
    M, R, nan_rows = 9, 4, [2, 5]
    b64 = _randn(gen, 20, R)
    gram = (b64.T @ b64).float()
    hsq = torch.rand(2, M, generator=gen, dtype=torch.float64).float() + 0.05
    hsq[1, nan_rows[1]] = float("nan")
    for dtype in DTYPES:
        u = _randn(gen, M, R).to(dtype)
        u[nan_rows[0], 1] = float("nan")
        ratio, sel, index, count = op(u.to(device), gram.to(device), hsq.to(device),
                                      torch.tensor(0.0, device=device), 0.5)
        ratio_c, sel_c, n = ratio.cpu(), sel.cpu(), int(count.cpu()[0])
        others = [i for i in range(M) if i not in nan_rows]
        want = torch.nonzero(ratio_c >= 0).flatten()
        if not torch.isnan(ratio_c[nan_rows]).all() or not torch.isfinite(ratio_c[others]).all() or \
                not torch.equal(sel_c, ratio_c >= 0) or n != want.numel() or not torch.equal(index.cpu()[:n].long(), want):
            return math.inf
    return 0.0


def check_gated_expand_add_(device: torch.device, op: Optional[Callable] = None) -> float:
    """``y[index[j]] += scale · u[index[j]] bᵀ`` for ``j < count`` in place, against float64; ``y`` a column
    slice with sentinel columns, rows not in the list must be untouched (else ``inf``). Cases: M=37, N=72,
    R=3 with every third row; M=70, N=200, R=40 with 0 rows (count 0) and with all rows."""
    op = op if op is not None else torch.ops.pyfastpeft_C.gated_expand_add_
    gen = torch.Generator().manual_seed(1357)
    worst, pad = 0.0, 5
    for M, N, R, step, scale in ((37, 72, 3, 3, 0.75), (70, 200, 40, 0, -0.5), (70, 200, 40, 1, 2.0)):
        y64, u64, b64 = _randn(gen, M, N), _randn(gen, M, R), _randn(gen, N, R)
        rows = torch.arange(0, M, step) if step else torch.zeros(0, dtype=torch.long)
        index = torch.full((M,), -1, dtype=torch.int32)  # entries past the count must never be read
        index[: rows.numel()] = rows.int()
        count = torch.tensor([rows.numel()], dtype=torch.int32)
        for dtype in DTYPES:
            y_lo, u_lo, b_lo = y64.to(dtype), u64.to(dtype), b64.to(dtype)
            ref = y_lo.double()
            ref[rows] += scale * (u_lo.double()[rows] @ b_lo.double().T)
            buf = torch.full((M, N + pad), 12345.0, dtype=dtype, device=device)
            buf[:, :N] = y_lo.to(device)
            y = buf[:, :N]
            op(y, u_lo.to(device), b_lo.to(device), index.to(device), count.to(device), scale)
            if not bool((buf[:, N:].cpu() == 12345.0).all()):
                return math.inf
            worst = max(worst, _norm_err(y, ref, dtype, R + 1))
    return worst




# CUDA op name -> twin check (see pyfastpeft.core.twin)
TWIN_CHECKS: dict[str, Callable[[torch.device], float]] = {
    "lora_shrink": check_lora_shrink,
    "lora_expand_add_": check_lora_expand_add_,
    "gated_gate": check_gated_gate,
    "gated_expand_add_": check_gated_expand_add_,
}
