"""``pfp.disable_adapters`` (a context: the base model's outputs and gradients) and ``pfp.unload`` (adapters
removed, not merged), PEFT's meanings, for every method, with a trained head in ``modules_to_save``."""
from __future__ import annotations

import copy

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.surgery import is_adapter
from pyfastpeft.testing import assert_rel_close
from tests._tiny_models import ALL_METHODS, METHOD_KWARGS, TARGETS, build, example_input, logits, perturb_adapters


def _case(kind, method):
    base = build(kind)
    head = "lm_head" if kind == "llama" else "head"
    model = pfp.inject(copy.deepcopy(base), method, target_modules=TARGETS[kind][method], backend="torch",
                       modules_to_save=[head], **METHOD_KWARGS[method])
    perturb_adapters(model)
    with torch.no_grad():
        model.get_submodule(head).weight.add_(0.1)  # a trained head
    return base, model, head


def _input_grad(model, x, kind):
    if kind == "llama":  # gradients through the embeddings' output
        emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
        y = model(inputs_embeds=emb).logits
        leaf = emb
    else:
        leaf = x.clone().requires_grad_(True)
        y = model(leaf)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (y * w).sum().backward()
    return y.detach(), leaf.grad


@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_disable_adapters_gives_the_base_model(kind, method):
    base, model, head = _case(kind, method)
    x = example_input(kind)
    with torch.no_grad():
        adapted = logits(model, x)
    with pfp.disable_adapters(model) as m:
        assert m is model and not any(is_adapter(q) for q in model.modules())
        y, g = _input_grad(model, x, kind)
        y0, g0 = _input_grad(base, x, kind)
        assert torch.equal(y, y0)
        assert_rel_close("input gradient", g, g0)
    with torch.no_grad():
        assert torch.equal(logits(model, x), adapted)  # everything back, the head trained again
    assert model.get_submodule(head).weight.requires_grad


def test_disable_adapters_restores_after_an_exception():
    base, model, _ = _case("llama", "lora")
    n = sum(is_adapter(q) for q in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with pfp.disable_adapters(model):
            raise RuntimeError("boom")
    assert sum(is_adapter(q) for q in model.modules()) == n


@pytest.mark.parametrize("method", ALL_METHODS)
def test_unload_removes_adapters_without_merging(method):
    base, model, head = _case("llama", method)
    x = example_input("llama")
    pfp.unload(model)
    assert not any(is_adapter(q) for q in model.modules())
    with torch.no_grad():
        base.lm_head.weight.copy_(model.lm_head.weight)  # the trained head stays (PEFT's unload)
        assert torch.equal(logits(model, x), logits(base, x))
    assert sorted(model.state_dict()) == sorted(base.state_dict())  # a plain model again: base key names


@pytest.mark.skipif(getattr(pfp.nn, "FilterBlock", None) is None, reason="pfp.nn.FilterBlock: class not landed")
def test_filter_block_cannot_be_disabled_or_unloaded():
    from tests._tiny_models import tiny_vit

    model = tiny_vit()
    model.blocks[0].mlp = pfp.nn.FilterBlock(192, 192, rank=8, source="Mlp")
    for call in (lambda: pfp.disable_adapters(model).__enter__(), lambda: pfp.unload(model)):
        with pytest.raises(ValueError, match="'blocks.0.mlp' .FilterBlock. keeps no base layer"):
            call()
        assert isinstance(model.blocks[0].mlp, pfp.nn.FilterBlock)
