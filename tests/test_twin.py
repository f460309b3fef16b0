"""The first-use twin check (pyfastpeft._twin), on CPU with injected check functions.

Every test passes its own memo dict and a cache file under tmp_path (or monkeypatches the module's
memo and PYFASTPEFT_CACHE_DIR), so no verdict leaks between tests or into the user's cache.
"""
import json
import logging
import math

import pytest
import torch

from pyfastpeft import _twin

CPU = torch.device("cpu")


class FakeCheck:
    """A check function that returns a fixed error (or raises) and counts its calls."""

    def __init__(self, err=0.5, exc=None):
        self.err, self.exc, self.calls = err, exc, 0

    def __call__(self, device):
        self.calls += 1
        if self.exc is not None:
            raise self.exc
        return self.err


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "twin_checks.json"


def test_pass_runs_once_and_is_cached(cache):
    memo, fn = {}, FakeCheck(0.5)
    assert _twin._run_check("op_a", CPU, fn, memo=memo, path=cache) is None
    assert _twin._run_check("op_a", CPU, fn, memo=memo, path=cache) is None
    assert fn.calls == 1
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["ok"] is True and entry["op"] == "op_a" and entry["max_err"] == 0.5
    assert entry["threshold"] == _twin.THRESHOLD


def test_cache_file_round_trip(cache):
    _twin._run_check("op_a", CPU, FakeCheck(0.5), memo={}, path=cache)
    _twin._run_check("op_b", CPU, FakeCheck(1e3), memo={}, path=cache)
    data = json.loads(cache.read_text())
    assert sorted(e["op"] for e in data.values()) == ["op_a", "op_b"]
    # A new process (fresh memo) reads both verdicts without running anything.
    never = FakeCheck(exc=AssertionError("the check must come from the cache file"))
    memo = {}
    assert _twin._run_check("op_a", CPU, never, memo=memo, path=cache) is None
    assert "op_b" in _twin._run_check("op_b", CPU, never, memo=memo, path=cache)
    assert never.calls == 0


def test_failure_disables_and_warns(cache, caplog):
    memo, fn = {}, FakeCheck(123.0)
    with caplog.at_level(logging.WARNING, logger="pyfastpeft"):
        reason = _twin._run_check("lora_shrink", CPU, fn, memo=memo, path=cache)
    assert reason is not None and "lora_shrink" in reason and "123" in reason and "disabled" in reason
    warnings = [r for r in caplog.records if r.name == "pyfastpeft" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lora_shrink" in warnings[0].getMessage() and "123" in warnings[0].getMessage()
    # cached in memory: no re-run, same reason
    assert _twin._run_check("lora_shrink", CPU, fn, memo=memo, path=cache) == reason and fn.calls == 1
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["ok"] is False and entry["reason"] == reason
    # a new process re-reads the failure from the file and warns again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyfastpeft"):
        assert _twin._run_check("lora_shrink", CPU, fn, memo={}, path=cache) == reason
    assert fn.calls == 1 and any("lora_shrink" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("err", [math.nan, math.inf, _twin.THRESHOLD * 1.01])
def test_non_finite_or_above_threshold_fails(cache, err):
    assert _twin._run_check("op_a", CPU, FakeCheck(err), memo={}, path=cache) is not None


def test_threshold_itself_passes(cache):
    assert _twin._run_check("op_a", CPU, FakeCheck(_twin.THRESHOLD), memo={}, path=cache) is None


def test_exception_disables_for_this_process_only(cache, caplog):
    memo = {}
    with caplog.at_level(logging.WARNING, logger="pyfastpeft"):
        reason = _twin._run_check("op_a", CPU, FakeCheck(exc=RuntimeError("boom")), memo=memo, path=cache)
    assert "op_a" in reason and "boom" in reason and "disabled" in reason
    assert any("boom" in r.getMessage() for r in caplog.records)
    assert not cache.exists()  # possibly transient (OOM, ...): not persisted
    fn = FakeCheck(0.1)
    assert _twin._run_check("op_a", CPU, fn, memo={}, path=cache) is None and fn.calls == 1


def test_key_includes_versions(cache, monkeypatch):
    fn = FakeCheck(0.1)
    _twin._run_check("op_a", CPU, fn, memo={}, path=cache)
    monkeypatch.setattr(_twin, "_pkg_version", lambda: "999.0")
    _twin._run_check("op_a", CPU, fn, memo={}, path=cache)
    assert fn.calls == 2
    data = json.loads(cache.read_text())
    assert len(data) == 2 and {e["pyfastpeft"] for e in data.values()} >= {"999.0"}


def test_corrupt_cache_file_is_replaced(cache):
    cache.write_text("{not json")
    fn = FakeCheck(0.2)
    assert _twin._run_check("op_a", CPU, fn, memo={}, path=cache) is None and fn.calls == 1
    assert len(json.loads(cache.read_text())) == 1


def test_cuda_op_ok_uses_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path / "cachedir"))
    monkeypatch.delenv("PYFASTPEFT_TWIN_CHECK", raising=False)
    monkeypatch.setattr(_twin, "_MEMO", {})
    fn = FakeCheck(0.3)
    monkeypatch.setitem(_twin.TWIN_CHECKS, "fake_op", fn)
    assert _twin.cuda_op_ok("fake_op", CPU) is None
    assert _twin.cuda_op_ok("fake_op", CPU) is None
    assert fn.calls == 1
    path = tmp_path / "cachedir" / "twin_checks.json"
    assert path == _twin.cache_path() and path.exists()
    assert any(k.startswith("fake_op|") for k in json.loads(path.read_text()))


def test_env_switch_skips_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_TWIN_CHECK", "0")
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_twin, "_MEMO", {})
    fn = FakeCheck(1e9)
    monkeypatch.setitem(_twin.TWIN_CHECKS, "fake_op", fn)
    assert _twin.cuda_op_ok("fake_op", CPU) is None
    assert _twin.cuda_op_ok("no_such_op", CPU) is None
    assert fn.calls == 0 and not (tmp_path / "twin_checks.json").exists()


def test_op_without_check_is_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("PYFASTPEFT_TWIN_CHECK", raising=False)
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path))
    reason = _twin.cuda_op_ok("no_such_op", CPU)
    assert reason is not None and "no_such_op" in reason


def test_registry_covers_the_extension_ops():
    assert {"lora_shrink", "lora_expand_add_", "gated_gate", "gated_expand_add_"} <= set(_twin.TWIN_CHECKS)


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
    assert _twin.check_lora_shrink(CPU, op=_shrink_ok) <= _twin.THRESHOLD / 4
    assert _twin.check_lora_shrink(CPU, op=_shrink_drops_last_k) > _twin.THRESHOLD
    assert _twin.check_lora_shrink(CPU, op=_shrink_first_chunk_only) > _twin.THRESHOLD


def test_expand_check_function():
    assert _twin.check_lora_expand_add_(CPU, op=_expand_ok) <= _twin.THRESHOLD / 4
    assert _twin.check_lora_expand_add_(CPU, op=_expand_ignores_scale) > _twin.THRESHOLD
    assert _twin.check_lora_expand_add_(CPU, op=_expand_writes_past_n) == math.inf


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
    assert _twin.check_gated_gate(CPU, op=_gate_ok) <= _twin.THRESHOLD / 4
    assert _twin.check_gated_gate(CPU, op=_gate_strict_compare) == math.inf
    assert _twin.check_gated_gate(CPU, op=_gate_unstable) == math.inf
    assert _twin.check_gated_gate(CPU, op=_gate_ignores_scale) > _twin.THRESHOLD


def test_gated_expand_check_function():
    assert _twin.check_gated_expand_add_(CPU, op=_gexpand_ok) <= _twin.THRESHOLD / 4
    assert _twin.check_gated_expand_add_(CPU, op=_gexpand_all_rows) > _twin.THRESHOLD
    assert _twin.check_gated_expand_add_(CPU, op=_gexpand_reads_past_count) > _twin.THRESHOLD
