"""``pfp.inject`` / ``pfp.from_peft`` / ``pfp.merge_and_unload`` / ``pfp.summary`` on tiny transformers and timm
models built from configs: PEFT's target_modules meanings (checked against PEFT itself), freezing, errors,
identical outputs after converting PEFT models (PEFT is the oracle)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.surgery import METHODS, match_modules
from pyfastpeft.testing import assert_rel_close
from tests._tiny_models import (ALL_METHODS, METHOD_KWARGS, TARGETS, build, example_input, inject_case, logits,
                                method_param, perturb_adapters, tiny_llama, tiny_vit)

peft = pytest.importorskip("peft")

PATTERNS = {
    "llama": [["q_proj", "v_proj"], ["self_attn.o_proj", "mlp.up_proj"], "all-linear", r".*\.mlp\.(gate|up)_proj",
              r"model\.layers\.1\..*_proj", ["layers.0.self_attn.k_proj"]],
    "vit": [["qkv"], ["attn.proj", "fc1"], "all-linear", r"blocks\.\d+\.mlp\.fc\d", ["blocks.1.attn.qkv", "head"]],
}


def _peft_targets(model, target_modules, exclude_modules=None) -> set:
    cfg = peft.LoraConfig(r=2, target_modules=target_modules, exclude_modules=exclude_modules)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pre = "base_model.model."
    return {n[len(pre):] if n.startswith(pre) else n for n in pm.targeted_module_names}


@pytest.mark.parametrize("kind,pattern", [(k, p) for k, ps in PATTERNS.items() for p in ps],
                         ids=lambda v: str(v) if not isinstance(v, list) else ",".join(v))
def test_target_modules_match_peft(kind, pattern):
    model = build(kind)
    ours = set(match_modules(model, pattern))
    theirs = _peft_targets(model, pattern)
    if kind == "vit" and pattern == "all-linear":
        # PEFT skips only a transformers output head; we also skip timm's get_classifier() (documented)
        assert theirs - ours == {"head"} and ours <= theirs
    else:
        assert ours == theirs


def test_exclude_modules_match_peft():
    model = tiny_llama()
    for tm, ex in ((["q_proj", "v_proj"], ["layers.1.self_attn.v_proj"]), ("all-linear", r".*\.mlp\..*")):
        assert set(match_modules(model, tm, ex)) == _peft_targets(model, tm, ex)


def test_suffix_matches_only_on_name_boundaries():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    model.add_module("xq_proj", nn.Linear(4, 4))
    assert match_modules(model, ["q_proj"]) == ["q_proj"]


@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_inject_replaces_freezes_and_keeps_outputs(kind, method):
    base = build(kind)
    x = example_input(kind)
    with torch.no_grad():
        want = logits(base, x)
    model = pfp.inject(copy.deepcopy(base), method, target_modules=TARGETS[kind][method], backend="torch",
                       **METHOD_KWARGS[method])
    names = match_modules(base, TARGETS[kind][method])
    mods = dict(model.named_modules())
    for n in names:
        assert pfp.surgery.method_of(mods[n]) == method, n
        assert mods[n].backend == "torch"
    s = pfp.summary(model)
    assert sorted(s.adapters) == sorted(names)
    adapter_ids = {id(t) for n in names for t in pfp.surgery.adapter_state_dict(mods[n]).values()
                   if isinstance(t, nn.Parameter)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == adapter_ids  # everything else is frozen
    assert s.trainable == sum(p.numel() for p in trainable) > 0
    assert s.total == sum(p.numel() for p in base.parameters()) + s.trainable
    assert f"{s.trainable:,}" in str(s)
    with torch.no_grad():  # every method starts as the base model
        assert_rel_close("output at init", logits(model, x), want)
    perturb_adapters(model)
    logits(model, x).float().pow(2).mean().backward()
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None


def test_inject_is_verbose_on_request(capsys):
    pfp.inject(tiny_llama(), "lora", target_modules=["q_proj"], r=2, alpha=4, verbose=True)
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out and "trainable params" in out


def test_all_linear_leaves_output_heads():
    llama = pfp.inject(tiny_llama(), "lora", target_modules="all-linear", r=2, alpha=4, backend="torch")
    assert type(llama.lm_head) is nn.Linear
    assert len(pfp.summary(llama).adapters) == 14  # 7 projections x 2 layers
    vit = pfp.inject(tiny_vit(), "lora", target_modules="all-linear", r=2, alpha=4, backend="torch")
    assert type(vit.head) is nn.Linear
    assert len(pfp.summary(vit).adapters) == 8  # qkv, proj, fc1, fc2 x 2 blocks


def test_shared_module_gets_one_adapter():
    lin = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)})
    pfp.inject(model, "lora", target_modules=["a"], r=2, alpha=4)
    assert model["a"] is model["b"][0]
    assert isinstance(model["a"], pfp.nn.LoRALinear)


def test_pattern_matching_nothing_lists_close_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'q_prj'.*q_proj"):
        pfp.inject(model, "lora", target_modules=["q_prj"], r=2, alpha=4)
    with pytest.raises(ValueError, match=r"regex.*matches no module.*close names"):
        pfp.inject(model, "lora", target_modules=r"q_proj", r=2, alpha=4)  # fullmatch: needs the full name
    with pytest.raises(ValueError, match="exclude_modules"):
        pfp.inject(model, "lora", target_modules=["q_proj"], exclude_modules=r".*", r=2, alpha=4)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        pfp.inject(model, "lora", target_modules="(", r=2, alpha=4)
    assert not any(pfp.surgery.is_adapter(m) for m in model.modules())  # nothing was touched


def test_unsupported_layer_names_module_and_type():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp'.*LlamaMLP"):
        pfp.inject(model, "lora", target_modules=["mlp"], r=2, alpha=4)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens'.*Embedding"):
        pfp.inject(model, "gated_lora", target_modules=["embed_tokens"], r=2, alpha=4)
    assert not any(pfp.surgery.is_adapter(m) for m in model.modules())


def test_bad_method_and_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method must be one of"):
        pfp.inject(model, "dora", target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['rank'\]"):
        pfp.inject(model, "lora", target_modules=["q_proj"], rank=4, alpha=4)
    with pytest.raises(ValueError, match=r"LoRALinear.from_linear failed for module 'model.layers.0.self_attn.q_proj'"):
        pfp.inject(model, "lora", target_modules=["q_proj"], r=0, alpha=4)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj'.*r=48 must be <= "):
        pfp.inject(model, "lora", target_modules=["q_proj", "k_proj"], r=48, alpha=4)  # q_proj (64) built first
    assert not any(pfp.surgery.is_adapter(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen by the failed call
    pfp.inject(model, "lora", target_modules=["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="already holds a pyfastpeft adapter"):
        pfp.inject(model, "lora", target_modules=["q_proj"], r=2, alpha=4)


@pytest.mark.parametrize("method", [method_param("oft")])
def test_method_kwarg_named_method_reaches_the_constructor(method):
    # inject's own `method` is positional-only: OFT's `method=` (Cayley variant) is a constructor kwarg
    model = pfp.inject(tiny_llama(), method, target_modules=["q_proj"], block_size=8, method="exact")
    assert model.model.layers[0].self_attn.q_proj.adapter_config()["method"] == "exact"


def test_methods_come_from_the_table_of_families():
    from pyfastpeft.families import methods

    assert pfp.surgery.available_methods() == list(methods())
    assert {"lora", "gated_lora", "oft", "psoft", "atoms"} <= set(methods())
    with pytest.raises(ValueError, match=r"method must be one of .*'gated_lora'.*got 'no_such_method'"):
        pfp.inject(tiny_llama(), "no_such_method", target_modules=["q_proj"], r=2, alpha=4)


@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_merge_and_unload(kind, method):
    model = inject_case(kind, method)
    perturb_adapters(model)
    x = example_input(kind)
    with torch.no_grad():
        want = logits(model, x)
        merged = pfp.merge_and_unload(model)
        assert not any(pfp.surgery.is_adapter(m) for m in merged.modules())
        assert not any(p.requires_grad for p in merged.parameters())
        assert_rel_close("merged output", logits(merged, x), want)


def test_merge_refusal_names_the_module():
    model = inject_case("llama", "gated_lora", tau_init=0.5)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*cannot be merged.*tau"):
        pfp.merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, pfp.nn.GatedLoRALinear)  # nothing replaced


# ---------------------------------------------------------------------------------------------------------
# from_peft: PEFT is the oracle
# ---------------------------------------------------------------------------------------------------------
def _peft_lora(kind, **cfg):
    model = build(kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind]["lora"], init_lora_weights=False, **cfg)
    return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("gated", [False, True], ids=["lora", "gated"])
def test_from_peft_lora_same_outputs_and_grads(kind, gated):
    pm = _peft_lora(kind, use_rslora=kind == "vit")
    x = example_input(kind)
    want = logits(pm, x)
    want.float().pow(2).mean().backward()
    want_grads = {n.replace(".default", "").replace("base_model.model.", ""): p.grad.clone()
                  for n, p in pm.named_parameters() if p.requires_grad}
    ours = pfp.from_peft(pm, gated=gated)
    assert not isinstance(ours, peft.PeftModel)
    cls = pfp.nn.GatedLoRALinear if gated else pfp.nn.LoRALinear
    names = match_modules(build(kind), TARGETS[kind]["lora"])
    mods = dict(ours.named_modules())
    assert all(type(mods[n]) is cls for n in names)
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in ours.modules())
    for m in ours.modules():
        if isinstance(m, cls):
            m.backend = "torch"
    got = logits(ours, x)
    assert_rel_close("output", got, want.detach())
    got.float().pow(2).mean().backward()
    got_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad and not n.endswith("tau")}
    assert set(got_grads) == set(want_grads)
    for n, g in got_grads.items():
        assert_rel_close(n, g, want_grads[n])


def _peft_orthogonal(kind, method):
    model = build(kind)
    targets = TARGETS[kind][method]
    if method == "oft":
        cfg = peft.OFTConfig(oft_block_size=8, r=0, target_modules=targets, init_weights=False)
    else:
        cfg = peft.PsoftConfig(r=4, psoft_alpha=8, target_modules=targets, init_weights=False)
    return peft.get_peft_model(model, cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("method", [method_param("oft"), method_param("psoft")])
def test_from_peft_orthogonal_same_outputs(kind, method):
    pm = _peft_orthogonal(kind, method)
    x = example_input(kind)
    with torch.no_grad():
        want = logits(pm, x)
        ours = pfp.from_peft(pm)
        cls = getattr(pfp.nn, METHODS[method].builders[0].cls.__name__)
        assert any(type(m) is cls for m in ours.modules())
        assert_rel_close("output", logits(ours, x), want)


def test_from_peft_without_our_class_is_a_clear_error(monkeypatch):
    pm = _peft_lora("llama")
    monkeypatch.delattr(pfp.nn.LoRALinear, "from_peft")
    with pytest.raises(ValueError, match=r"PEFT LORA layer.*LoRALinear.from_peft is not available"):
        pfp.from_peft(pm)


def test_from_peft_unsupported_layer_names_it_or_merges():
    model = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                                    init_lora_weights=False)).eval()
    x = example_input("llama")
    with torch.no_grad():
        want = logits(pm, x)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens'.*merge_unsupported=True"):
        pfp.from_peft(pm)
    ours = pfp.from_peft(pm, merge_unsupported=True)
    assert type(ours.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        assert_rel_close("output", logits(ours, x), want)


def test_from_peft_modules_to_save_and_no_adapter():
    pm = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"],
                                                         init_lora_weights=False)).eval()
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].weight.mul_(2)  # the trained copy differs
        x = example_input("vit")
        want = logits(pm, x)
        ours = pfp.from_peft(pm)
        assert type(ours.head) is nn.Linear and ours.head.weight.requires_grad
        assert_rel_close("output", logits(ours, x), want)
    with pytest.raises(ValueError, match="no PEFT adapter layer"):
        pfp.from_peft(tiny_vit())
