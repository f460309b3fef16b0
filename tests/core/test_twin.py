"""The first-use twin check framework (pyfastpeft.core.twin), on CPU with injected check functions.

The LoRA family's check functions themselves: tests/lora/test_twin_checks.py.

Every test passes its own memo dict and a cache file under tmp_path (or monkeypatches the module's
memo and PYFASTPEFT_CACHE_DIR), so no verdict leaks between tests or into the user's cache.
"""
import json
import logging
import math

import pytest
import torch

from pyfastpeft.core import twin as _twin
from pyfastpeft.families import twin_checks

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
    assert _twin.cuda_op_ok("fake_op", CPU, fn) is None
    assert _twin.cuda_op_ok("fake_op", CPU, fn) is None
    assert fn.calls == 1
    path = tmp_path / "cachedir" / "twin_checks.json"
    assert path == _twin.cache_path() and path.exists()
    assert any(k.startswith("fake_op|") for k in json.loads(path.read_text()))


def test_env_switch_skips_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_TWIN_CHECK", "0")
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_twin, "_MEMO", {})
    fn = FakeCheck(1e9)
    assert _twin.cuda_op_ok("fake_op", CPU, fn) is None
    assert _twin.cuda_op_ok("no_such_op", CPU, twin_checks().get("no_such_op")) is None
    assert fn.calls == 0 and not (tmp_path / "twin_checks.json").exists()


def test_op_without_check_is_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("PYFASTPEFT_TWIN_CHECK", raising=False)
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path))
    reason = _twin.cuda_op_ok("no_such_op", CPU, twin_checks().get("no_such_op"))
    assert reason is not None and "no_such_op" in reason


def test_cuda_ops_ok_names_the_first_failing_op(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PYFASTPEFT_TWIN_CHECK", raising=False)
    monkeypatch.setattr(_twin, "_MEMO", {})
    good, bad = FakeCheck(0.1), FakeCheck(1e9)
    assert _twin.cuda_ops_ok(("op_good",), CPU, {"op_good": good}) is None
    why = _twin.cuda_ops_ok(("op_good", "op_bad"), CPU, {"op_good": good, "op_bad": bad})
    assert why is not None and why.startswith("op_bad disabled on this GPU") and good.calls == 1
    assert _twin.cuda_ops_ok(("op_missing",), CPU, {}).startswith("op_missing disabled on this GPU")
