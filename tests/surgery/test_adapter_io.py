"""``pfp.save_adapter`` / ``pfp.load_adapter``: safetensors + JSON, bit-exact round trip into a freshly built
base model, and the errors for models of another shape."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.surgery import (CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME, adapter_state_dict,
                                is_adapter)
from tests._tiny_models import (ALL_METHODS, build, example_input, inject_case, logits, perturb_adapters,
                                tiny_llama)

pytest.importorskip("safetensors")


def _adapter_tensors(model) -> dict:
    return {f"{n}.{k}": t.detach().clone() for n, m in model.named_modules() if is_adapter(m)
            for k, t in adapter_state_dict(m).items()}


PEFT_METHODS = {"lora": "LORA", "oft": "OFT", "psoft": "PSOFT"}


@pytest.mark.parametrize("fmt", ["auto", "pyfastpeft"])
@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_round_trip_bit_exact_into_fresh_model(tmp_path, kind, method, fmt):
    extra = {"tau_init": 0.01} if method == "gated_lora" else {}
    model = inject_case(kind, method, **extra)
    perturb_adapters(model)
    meta = pfp.save_adapter(model, tmp_path / "ad", format=fmt)
    peft_file = fmt == "auto" and method in PEFT_METHODS  # methods PEFT has: PEFT's format by default
    cfg_name, w_name = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME) if peft_file else (CONFIG_NAME, WEIGHTS_NAME)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([cfg_name, w_name])
    on_disk = json.loads((tmp_path / "ad" / cfg_name).read_text())
    assert meta == {cfg_name: on_disk}
    if peft_file:
        assert on_disk["peft_type"] == PEFT_METHODS[method]
    else:
        assert on_disk["pyfastpeft_version"] == pfp.__version__
        assert {v["method"] for v in on_disk["modules"].values()} == {method}

    fresh = build(kind)  # same seed: the same base weights, no adapter
    assert not any(is_adapter(m) for m in fresh.modules())
    pfp.load_adapter(fresh, tmp_path / "ad")
    want, got = _adapter_tensors(model), _adapter_tensors(fresh)
    assert set(want) == set(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert pfp.summary(fresh).trainable == pfp.summary(model).trainable
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    for m in fresh.modules():
        if is_adapter(m):
            m.backend = "torch"
    x = example_input(kind)
    with torch.no_grad():
        assert torch.equal(logits(fresh, x), logits(model, x))


def test_gated_settings_and_tau_survive(tmp_path):
    model = inject_case("llama", "gated_lora", tau_init=0.25, gate_width=0.1, gate_grad="full")
    pfp.save_adapter(model, tmp_path)
    fresh = pfp.load_adapter(tiny_llama(), tmp_path)
    layer = fresh.model.layers[1].self_attn.v_proj
    assert isinstance(layer, pfp.nn.GatedLoRALinear)
    assert (float(layer.tau.detach()), layer.gate_width, layer.gate_grad) == (0.25, 0.1, "full")
    assert layer.backend == "torch"  # the saved backend pin is kept


def test_load_into_model_that_already_holds_the_adapters(tmp_path):
    src = inject_case("vit", "lora")
    perturb_adapters(src)
    pfp.save_adapter(src, tmp_path)
    dst = inject_case("vit", "lora")  # same structure, different (zero-B) adapter values
    pfp.load_adapter(dst, tmp_path)
    for k, t in _adapter_tensors(src).items():
        assert torch.equal(t, _adapter_tensors(dst)[k]), k


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    pfp.save_adapter(inject_case("llama", "lora"), tmp_path)
    other = tiny_llama(intermediate=96)  # down_proj: 96 -> 64 instead of 128 -> 64
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight' "
                                         r"has shape "
                                         r"\(4, 128\) in the file but \(4, 96\) in the model"):
        pfp.load_adapter(other, tmp_path)
    assert not any(is_adapter(m) for m in other.modules())  # nothing installed
    assert all(p.requires_grad for p in other.parameters())  # and nothing frozen


def test_missing_module_and_bad_files(tmp_path):
    pfp.save_adapter(inject_case("llama", "lora"), tmp_path / "ad")
    with pytest.raises(ValueError, match=r"has no module 'model\.layers\.0\."):
        pfp.load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path / "ad")
    with pytest.raises(ValueError, match="expected adapter_config.json and adapter_model.safetensors .PEFT's format. "
                                         "or pyfastpeft_adapter.json"):
        pfp.load_adapter(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no pyfastpeft adapter"):
        pfp.save_adapter(tiny_llama(), tmp_path / "empty")


@pytest.mark.skipif(getattr(pfp.nn, "FilterBlock", None) is None, reason="pfp.nn.FilterBlock: class not landed")
def test_filter_block_round_trip(tmp_path):
    from tests._tiny_models import tiny_vit

    model = tiny_vit().requires_grad_(False)  # as pfp.subtractive.fit(freeze=True) leaves it
    block = pfp.nn.FilterBlock(192, 192, rank=8, source="Mlp")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p))
    model.blocks[0].mlp = block  # what pfp.subtractive.fit does
    pfp.save_adapter(model, tmp_path)
    fresh = pfp.load_adapter(tiny_vit(), tmp_path)
    assert type(fresh.blocks[0].mlp) is pfp.nn.FilterBlock
    for (n, a), (_, b) in zip(model.blocks[0].mlp.state_dict().items(), fresh.blocks[0].mlp.state_dict().items()):
        assert torch.equal(a, b), n
    x = example_input("vit")
    with torch.no_grad():
        assert torch.equal(logits(fresh.eval(), x), logits(model.eval(), x))
