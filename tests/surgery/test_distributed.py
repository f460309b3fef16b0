"""Every method under DDP, FSDP2, FSDP2 + MixedPrecisionPolicy(bf16 params, fp32 reduce) and DeepSpeed ZeRO-3
(when DeepSpeed is installed: the ``test`` extra installs it): 2 CPU processes
(gloo), one process group for everything (``_dist_worker.py``), each against one process on the whole batch:
gradients, 3 AdamW steps, save (files equal to an unsharded save), reload into a sharded model, merge.

Budgets: fp32 modes ``PEER_REL`` (the same maths, another summation order); bf16 mixed precision
``GRAD_FACTOR x`` the error of a bf16 copy of the model in one process (same precision, no sharding) plus the
bf16 floor, as every low-precision check in ``pyfastpeft.testing``. DeepSpeed on CPU compiles its
shared-memory communication op on first use (minutes, once; cached in ``~/.cache/torch_extensions``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyfastpeft.testing import GRAD_FACTOR, LOWP_FLOOR, PEER_REL

ROOT = Path(__file__).resolve().parents[2]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MODES = ["ddp", "fsdp2", "fsdp2_mp"] + (["zero3"] if HAS_DEEPSPEED else [])
ALL_MODES = [m if m in MODES else pytest.param(m, marks=pytest.mark.skip(
    reason="DeepSpeed is not installed (pip install 'pyfastpeft[test]' installs it)")) for m in
    ["ddp", "fsdp2", "fsdp2_mp", "zero3"]]
METHODS = ["lora", "gated_lora", "oft", "psoft", "atoms"]

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no torch.distributed with the gloo backend", allow_module_level=True)
pytest.importorskip("transformers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PFP_DIST_TIMEOUT": "560", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "surgery" / "_dist_worker.py"), str(_free_port()),
                           str(out), ",".join(MODES)], env=env, capture_output=True, text=True, timeout=600)
    path = out / "results_rank0.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    errors = {k: v["error"] for k, v in res.items() if "error" in v}
    assert proc.returncode == 0 and not errors, f"worker failed: {errors or proc.stderr[-3000:]}"
    return res


@pytest.mark.slow
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("method", METHODS)
def test_matches_one_process(results, method, mode):
    r = results[f"{method}/{mode}"]
    # files: config byte for byte, tensors byte for byte; reload bit-exact
    assert r["save_bytes_equal"], "the sharded model's adapter files differ from the unsharded model's"
    assert r["save"] == 0.0 and r["load"] == 0.0
    if mode != "ddp":
        assert r["load_uninjected_error"] == "ok", r["load_uninjected_error"]
    if method == "gated_lora":
        assert r["merge_refused"] == "ok", r["merge_refused"]  # tau > 0: ValueError, nothing changed
        if mode != "ddp":  # gate_loss reads tau outside the forward: not supported sharded, and says so
            assert r["gate_loss_refused"] == "ok", r["gate_loss_refused"]
    if mode == "fsdp2_mp":
        budget = GRAD_FACTOR * r["grad_lowp_baseline"] + LOWP_FLOOR[torch.bfloat16]
    else:
        budget = PEER_REL
    for stage in ("grad", "train", "merge", "merge_logits"):
        assert r[stage] <= budget, f"{method} {mode} {stage}: relative error {r[stage]:.3e} > {budget:.1e}"


@pytest.mark.slow
def test_sharding_holds_half_the_parameter_bytes_per_rank(results):
    for method in METHODS:
        ddp = results[f"{method}/ddp"]["bytes_per_rank"]
        for mode in set(MODES) - {"ddp"}:
            got = results[f"{method}/{mode}"]["bytes_per_rank"]
            assert ddp / 2 <= got <= ddp / 2 + 64 * 4 * 16, (method, mode, ddp, got)  # + padding of odd rows


@pytest.mark.slow
def test_our_ops_take_dtensors_outside_a_forward(results):
    r = results["cayley_dtensor"]  # pfp.cayley of a Shard(0) DTensor: no "no sharding strategy registered"
    assert r["placements"] == "[Replicate()]", r  # computed on the gathered input, as promised
    assert r["fwd"] <= PEER_REL and r["grad"] <= PEER_REL, r
