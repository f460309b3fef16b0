"""``pyfastpeft.surgery.sharding`` without a process group: plain models pass through untouched, a ZeRO-3
placeholder is never written, and ``import pyfastpeft`` does not import ``torch.distributed.tensor``."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.surgery import sharding
from tests._tiny_models import inject_case


def test_plain_model_is_not_sharded_and_helpers_are_no_ops(tmp_path):
    model = inject_case("llama", "lora")
    assert sharding.sharding_of(model) is None and not pfp.surgery.is_sharded(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with sharding.full_adapters(model, write_back=True):
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sd = pfp.surgery.full_state_dict(model)
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in before)


def _zero3_placeholder(full_shape):
    t = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves in .data outside GatheredParameters
    t.ds_id, t.ds_shape = 7, torch.Size(full_shape)
    return t


def test_a_zero3_placeholder_is_never_written():
    t = _zero3_placeholder((4, 64))
    assert sharding.is_zero3(t) and sharding.full_shape(t) == [4, 64]
    with pytest.raises(ValueError, match=r"'m\.lora_A\.weight' is a DeepSpeed ZeRO-3 partition placeholder of "
                                         r"shape \(0,\), not the full \(4, 64\)"):
        sharding.checked_cpu("m.lora_A.weight", t)
    gathered = t.detach().new_ones(4, 64)
    t.data = gathered  # inside GatheredParameters: the full tensor, accepted
    assert torch.equal(sharding.checked_cpu("m.lora_A.weight", t), gathered)


def test_a_sharded_model_is_recognised_by_its_zero3_parameters():
    model = torch.nn.Linear(4, 4)
    model.weight = _zero3_placeholder((4, 4))
    assert sharding.sharding_of(model) == "ZeRO-3"


def test_import_does_not_load_dtensor():
    code = "import sys, pyfastpeft; print('torch.distributed.tensor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
