"""PEFT's own adapter format: ``pfp.save_adapter`` → ``peft.PeftModel.from_pretrained`` gives the same outputs,
``PeftModel.save_pretrained`` → ``pfp.load_adapter`` (no PEFT model built) gives PEFT's outputs, mixed models,
``modules_to_save``, trained parameters never dropped, atomic writes, and what ``from_peft`` carries over.
Tiny Llama built from a config; nothing is downloaded."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.surgery import CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME, is_adapter
from pyfastpeft.testing import assert_rel_close
from tests._tiny_models import example_input, logits, perturb_adapters, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

X = example_input("llama")


def _out(model):
    with torch.no_grad():
        return logits(model.eval(), X)


def _perturb_peft(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else None


def _ours_lora(tmp_path):
    """LoRA with two ranks (PEFT's rank/alpha patterns), lora_bias, and a trained head (modules_to_save)."""
    m = tiny_llama()
    pfp.inject(m, "lora", target_modules=["q_proj", "down_proj"], r=4, alpha=8, lora_bias=True,
               modules_to_save=["lm_head"], backend="torch")
    pfp.inject(m, "lora", target_modules=["v_proj"], r=2, alpha=3, lora_bias=True, backend="torch")
    perturb_adapters(m)
    with torch.no_grad():
        m.lm_head.weight.add_(0.05)
    return m


OURS = {
    "lora": _ours_lora,
    "oft": lambda _: pfp.inject(tiny_llama(), "oft", target_modules=["q_proj", "v_proj", "down_proj"], block_size=8,
                                backend="torch"),
    "oft_exact_coft": lambda _: pfp.inject(tiny_llama(), "oft", target_modules=["q_proj"], block_size=16,
                                           method="exact", coft=True, eps=1e-3, block_share=True, backend="torch"),
    "psoft": lambda _: pfp.inject(tiny_llama(), "psoft", target_modules=["q_proj", "v_proj"], r=4, alpha=8,
                                  vectors=(True, False), backend="torch"),
}


@pytest.mark.parametrize("case", list(OURS))
def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path, case):
    model = OURS[case](tmp_path)
    if case != "lora":
        perturb_adapters(model)
    meta = pfp.save_adapter(model, tmp_path / "ad")
    cfg = meta[PEFT_CONFIG_NAME]
    assert cfg["peft_type"] == case.split("_")[0].upper()
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    assert_rel_close(f"PEFT vs ours ({case})", _out(pm), _out(model))
    # and back into ours, bit for bit
    fresh = pfp.load_adapter(tiny_llama(), tmp_path / "ad", backend="torch")
    assert torch.equal(_out(fresh), _out(model))


PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 5}, use_rslora=True,
                                    lora_bias=True, modules_to_save=["lm_head"]),
    "oft": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "down_proj"]),
    "psoft": lambda: peft.PsoftConfig(r=4, target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_saved_directory_loads_without_peft_model(tmp_path, method, caplog):
    pm = peft.get_peft_model(tiny_llama(), PEFT_CONFIGS[method]())
    _perturb_peft(pm)
    pm.save_pretrained(tmp_path / "ad")
    want = _out(pm)
    with caplog.at_level("INFO", logger="pyfastpeft"):
        ours = pfp.load_adapter(tiny_llama(), tmp_path / "ad", backend="torch")
    assert "peft format (adapter_config.json)" in caplog.text
    assert_rel_close(f"ours vs PEFT ({method})", _out(ours), want)
    peft_trainable = {n.replace("base_model.model.", "").replace(".default", "").replace("modules_to_save.", "")
                      for n, p in pm.named_parameters() if p.requires_grad}
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    if method == "oft":
        ours_trainable = {n.replace("oft_v", "oft_R.weight") for n in ours_trainable}
    if method == "psoft":
        ours_trainable = {n.replace("psoft_v", "psoft_R.weight").replace("vector_", "psoft_R.vector_")
                          for n in ours_trainable}
    assert ours_trainable == peft_trainable


def test_mixed_model_saves_each_part_in_its_format(tmp_path):
    model = tiny_llama()
    pfp.inject(model, "lora", target_modules=["q_proj"], r=4, alpha=8, backend="torch")
    pfp.inject(model, "gated_lora", target_modules=["v_proj"], r=4, alpha=8, tau_init=0.01, backend="torch")
    perturb_adapters(model)
    meta = pfp.save_adapter(model, tmp_path)
    assert set(meta) == {PEFT_CONFIG_NAME, CONFIG_NAME}
    assert {p.name for p in tmp_path.iterdir()} == {PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME}
    assert all(k.endswith("q_proj") for k in meta[PEFT_CONFIG_NAME]["target_modules"])
    assert all(k.endswith("v_proj") for k in meta[CONFIG_NAME]["modules"])
    fresh = pfp.load_adapter(tiny_llama(), tmp_path, backend="torch")
    assert torch.equal(_out(fresh), _out(model))
    peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # PEFT reads its part (the LoRA layers)


def test_two_peft_methods_raise_before_writing(tmp_path):
    model = tiny_llama()
    pfp.inject(model, "lora", target_modules=["q_proj"], r=4, alpha=8)
    pfp.inject(model, "oft", target_modules=["v_proj"], block_size=8)
    d = tmp_path / "ad"
    with pytest.raises(ValueError, match=r"mixes PEFT methods \['LORA', 'OFT'\].*format='pyfastpeft'"):
        pfp.save_adapter(model, d)
    assert not d.exists()
    pfp.save_adapter(model, d, format="pyfastpeft")
    assert {p.name for p in d.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' is a GatedLoRALinear"):
        gated = pfp.inject(tiny_llama(), "gated_lora", target_modules=["q_proj"], r=4, alpha=8)
        pfp.save_adapter(gated, d, format="peft")
    with pytest.raises(ValueError, match="PEFT's exact Cayley is 'minus'"):
        plus = pfp.inject(tiny_llama(), "oft", target_modules=["q_proj"], block_size=8, method="exact",
                          convention="plus")
        pfp.save_adapter(plus, d, format="peft")
    with pytest.raises(ValueError, match="differ in lora_dropout"):
        m = pfp.inject(tiny_llama(), "lora", target_modules=["q_proj"], r=4, alpha=8)
        pfp.inject(m, "lora", target_modules=["v_proj"], r=4, alpha=8, dropout=0.1)
        pfp.save_adapter(m, d)
    assert {p.name for p in d.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}  # nothing written by the failed saves


def test_trained_parameter_never_dropped(tmp_path):
    model = pfp.inject(tiny_llama(), "lora", target_modules=["q_proj"], r=4, alpha=8)
    model.lm_head.requires_grad_(True)  # trained, but not declared
    pfp.save_adapter(pfp.inject(tiny_llama(), "lora", target_modules=["q_proj"], r=4, alpha=8), tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) would not be saved: \['lm_head.weight'\]"):
        pfp.save_adapter(model, tmp_path)
    assert _snapshot(tmp_path) == before


def test_modules_to_save_travel_and_train(tmp_path):
    model = _ours_lora(tmp_path)
    assert model.lm_head.weight.requires_grad
    pfp.save_adapter(model, tmp_path)
    fresh = pfp.load_adapter(tiny_llama(), tmp_path, backend="torch")
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight) and fresh.lm_head.weight.requires_grad
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    # and in our format too
    pfp.save_adapter(model, tmp_path / "ours", format="pyfastpeft")
    fresh = pfp.load_adapter(tiny_llama(), tmp_path / "ours", backend="torch")
    assert torch.equal(_out(fresh), _out(model))
    with pytest.raises(ValueError, match="overlap target_modules"):
        pfp.inject(tiny_llama(), "lora", target_modules=["q_proj"], modules_to_save=["self_attn"], r=4, alpha=8)
    with pytest.raises(ValueError, match="modules_to_save: target_modules entries match no module"):
        pfp.inject(tiny_llama(), "lora", target_modules=["q_proj"], modules_to_save=["head"], r=4, alpha=8)


def test_failed_write_leaves_directory_as_it_was(tmp_path, monkeypatch):
    import safetensors.torch

    pfp.save_adapter(pfp.inject(tiny_llama(), "lora", target_modules=["q_proj"], r=4, alpha=8), tmp_path / "ad")
    before = _snapshot(tmp_path / "ad")
    model = pfp.inject(tiny_llama(), "lora", target_modules=["v_proj"], r=2, alpha=8)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        pfp.save_adapter(model, tmp_path / "ad")
    assert _snapshot(tmp_path / "ad") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary folder left behind


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.__setitem__("use_dora", True), "option use_dora=True cannot be represented.*DoRA"),
    (lambda c: c.__setitem__("peft_type", "IA3"), "peft_type 'IA3' is not one pyfastpeft reads"),
    (lambda c: c.pop("peft_type"), "neither a PEFT adapter config"),
    (lambda c: c.__setitem__("fan_in_fan_out", True), "fan_in_fan_out=True cannot be represented"),
], ids=["dora", "ia3", "no-peft-type", "fan-in-fan-out"])
def test_foreign_peft_config_named_in_error(tmp_path, edit, match):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    edit(cfg)
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps(cfg))
    model = tiny_llama()
    with pytest.raises(ValueError, match=match) as info:
        pfp.load_adapter(model, tmp_path)
    assert str(tmp_path / PEFT_CONFIG_NAME) in str(info.value)
    assert not any(is_adapter(m) for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_foreign_and_truncated_peft_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    w = tmp_path / PEFT_WEIGHTS_NAME
    good = w.read_bytes()
    t = load_file(str(w))
    t["base_model.model.model.norm.weight"] = torch.ones(64)
    save_file(t, str(w))
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.norm\.weight' is neither a LORA"):
        pfp.load_adapter(tiny_llama(), tmp_path)
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors' is not a readable safetensors file"):
        pfp.load_adapter(tiny_llama(), tmp_path)


# ------------------------------------------------------------------------------------------------ from_peft
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_from_peft_carries_lora_bias_biases_head_and_dtype(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_bias=True, bias="lora_only",
                          modules_to_save=["head"])
    pm = peft.get_peft_model(_Net(), cfg)
    _perturb_peft(pm)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = pm(x)
    trained = {n.replace("base_model.model.", "").replace(".default", "").replace("modules_to_save.", "")
               for n, p in pm.named_parameters() if p.requires_grad}
    ours = pfp.from_peft(pm)
    with torch.no_grad():
        assert_rel_close("from_peft output", ours(x), want)
    got = {n.replace("base_layer.", "") for n, p in ours.named_parameters() if p.requires_grad}
    assert got == {n.replace("base_layer.", "") for n in trained}  # base biases and the head still train
    assert ours.fc1.lora_bias
    with pytest.raises(ValueError, match=r"would not be saved: \['fc1.base_layer.bias', 'fc2.base_layer.bias'\]"):
        pfp.save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="already a pyfastpeft LoRALinear"):
        pfp.nn.LoRALinear.from_peft(ours.fc1)


def test_from_peft_keeps_fp32_adapters_on_bf16_model():
    pm = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.LoraConfig(r=4, lora_alpha=8,
                                                                              target_modules=["q_proj"]))
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ours = pfp.from_peft(pm)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16


def test_from_peft_dora_is_an_error():
    pm = peft.get_peft_model(_Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        pfp.from_peft(pm)


def test_directory_of_format_version_1_still_loads(tmp_path):
    """Before format_version 2 our schema was written under PEFT's file names."""
    model = pfp.inject(tiny_llama(), "gated_lora", target_modules=["q_proj"], r=4, alpha=8, tau_init=0.01,
                       backend="torch")
    perturb_adapters(model)
    pfp.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["format_version"] = 1
    del cfg["modules_to_save"]
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps(cfg))
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / PEFT_WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).unlink()
    fresh = pfp.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(_out(fresh), _out(model))
