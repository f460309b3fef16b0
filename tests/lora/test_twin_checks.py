"""The LoRA family's first-use twin checks (pyfastpeft.lora.twin), run on CPU with torch stand-ins for the CUDA
ops: an exact stand-in passes with margin, typical kernel bugs fail. The framework: tests/core/test_twin.py."""
import math

import torch

from pyfastpeft.core import twin as _twin
from pyfastpeft.families import twin_checks
from pyfastpeft.lora import twin as lora_twin

CPU = torch.device("cpu")


def test_registry_covers_the_extension_ops():
    assert {"lora_shrink", "lora_expand_add_", "gated_gate", "gated_expand_add_"} <= set(twin_checks())


# The real check functions, run on CPU with torch stand-ins for the CUDA ops: an honest fp32-accumulating
# implementation must pass with margin, and typical kernel bugs must fail.

def _shrink_ok(x, a):
    return (x.float() @ a.float().T).to(x.dtype)


def _shrink_drops_last_k(x, a):
    return (x[:, :-1].float() @ a[:, :-1].float().T).to(x.dtype)


def _shrink_first_chunk_only(x, a):  # as if the rank-chunk loop (R > 32) were missing
    u = _shrink_ok(x, a)
    u[:, 32:] = 0
    return u


def _expand_ok(y, u, b, scale):
    y.copy_((y.float() + scale * (u.float() @ b.float().T)).to(y.dtype))


def _expand_ignores_scale(y, u, b, scale):
    _expand_ok(y, u, b, 1.0)


def _expand_writes_past_n(y, u, b, scale):
    _expand_ok(y, u, b, scale)
    wide = y.as_strided((y.shape[0], y.shape[1] + 1), y.stride())
    wide[:, -1] = 0


def test_shrink_check_function():
    assert lora_twin.check_lora_shrink(CPU, op=_shrink_ok) <= _twin.THRESHOLD / 4
    assert lora_twin.check_lora_shrink(CPU, op=_shrink_drops_last_k) > _twin.THRESHOLD
    assert lora_twin.check_lora_shrink(CPU, op=_shrink_first_chunk_only) > _twin.THRESHOLD


def test_expand_check_function():
    assert lora_twin.check_lora_expand_add_(CPU, op=_expand_ok) <= _twin.THRESHOLD / 4
    assert lora_twin.check_lora_expand_add_(CPU, op=_expand_ignores_scale) > _twin.THRESHOLD
    assert lora_twin.check_lora_expand_add_(CPU, op=_expand_writes_past_n) == math.inf


def _gate_ok(u, gram, hsq, tau, scale):
    uf = u.float()
    ratio = scale * ((uf @ gram) * uf).sum(1).clamp(min=0).sqrt() / hsq.sum(0).sqrt().clamp(min=1e-6)
    sel = ratio >= tau.clamp(min=0)
    index = torch.full((u.shape[0],), -7, dtype=torch.int32)
    rows = torch.nonzero(sel).flatten()
    index[: rows.numel()] = rows.int()
    return ratio, sel, index, torch.tensor([rows.numel()], dtype=torch.int32)


def _gate_strict_compare(u, gram, hsq, tau, scale):  # ties at τ not selected
    ratio, _, index, _ = _gate_ok(u, gram, hsq, tau, scale)
    sel = ratio > tau.clamp(min=0)
    rows = torch.nonzero(sel).flatten()
    index[: rows.numel()] = rows.int()
    return ratio, sel, index, torch.tensor([rows.numel()], dtype=torch.int32)


def _gate_unstable(u, gram, hsq, tau, scale):  # the right set of rows, not in increasing order
    ratio, sel, index, count = _gate_ok(u, gram, hsq, tau, scale)
    n = int(count[0])
    index[:n] = index[:n].flip(0)
    return ratio, sel, index, count


def _gate_ignores_scale(u, gram, hsq, tau, scale):
    return _gate_ok(u, gram, hsq, tau, 1.0)


def _gexpand_ok(y, u, b, index, count, scale):
    rows = index[: int(count[0])].long()
    y[rows] = (y[rows].float() + scale * (u[rows].float() @ b.float().T)).to(y.dtype)


def _gexpand_all_rows(y, u, b, index, count, scale):  # ignores the selection
    _expand_ok(y, u, b, scale)


def _gexpand_reads_past_count(y, u, b, index, count, scale):
    _gexpand_ok(y, u, b, index, torch.tensor([min(int(count[0]) + 1, y.shape[0])]), scale)


def test_gate_check_function():
    assert lora_twin.check_gated_gate(CPU, op=_gate_ok) <= _twin.THRESHOLD / 4
    assert lora_twin.check_gated_gate(CPU, op=_gate_strict_compare) == math.inf
    assert lora_twin.check_gated_gate(CPU, op=_gate_unstable) == math.inf
    assert lora_twin.check_gated_gate(CPU, op=_gate_ignores_scale) > _twin.THRESHOLD


def test_gated_expand_check_function():
    assert lora_twin.check_gated_expand_add_(CPU, op=_gexpand_ok) <= _twin.THRESHOLD / 4
    assert lora_twin.check_gated_expand_add_(CPU, op=_gexpand_all_rows) > _twin.THRESHOLD
    assert lora_twin.check_gated_expand_add_(CPU, op=_gexpand_reads_past_count) > _twin.THRESHOLD
