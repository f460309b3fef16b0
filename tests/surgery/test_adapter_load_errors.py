"""``pfp.load_adapter`` on broken or mismatched files: every failure is a ``ValueError`` that names the file and
what is wrong, and leaves the model untouched (no parameter, buffer, ``requires_grad`` flag or submodule
changed)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.surgery import CONFIG_NAME, WEIGHTS_NAME, is_adapter
from tests._tiny_models import ALL_METHODS, inject_case, perturb_adapters, tiny_llama

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402


def _snapshot(model) -> dict:
    return {"params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "modules": {n: type(m) for n, m in model.named_modules()}}


def _assert_untouched(model, snap) -> None:
    now = _snapshot(model)
    assert now["modules"] == snap["modules"], "the model's submodules changed"
    assert now["params"].keys() == snap["params"].keys() and now["buffers"].keys() == snap["buffers"].keys()
    for n, (t, rg) in snap["params"].items():
        t2, rg2 = now["params"][n]
        assert torch.equal(t, t2), f"parameter {n} changed"
        assert rg == rg2, f"requires_grad of {n} changed"
    for n, t in snap["buffers"].items():
        assert torch.equal(t, now["buffers"][n]), f"buffer {n} changed"
    assert not any(is_adapter(m) for m in model.modules())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    model = inject_case("llama", "lora")
    perturb_adapters(model)
    pfp.save_adapter(model, d, format="pyfastpeft")
    return d


@pytest.fixture
def ad(saved, tmp_path):
    """A fresh copy of the saved adapter directory that a test may corrupt."""
    d = tmp_path / "ad"
    shutil.copytree(saved, d)
    return d


def _load_fails(ad, match: str, *, file: str, model=None):
    model = model if model is not None else tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        pfp.load_adapter(model, ad)
    assert str(ad / file) in str(info.value), f"the error does not name {file}: {info.value}"
    _assert_untouched(model, snap)
    return info.value


def _edit_config(ad, fn):
    cfg = json.loads((ad / CONFIG_NAME).read_text())
    fn(cfg)  # edits in place
    (ad / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_tensors(ad, fn):
    t = load_file(str(ad / WEIGHTS_NAME))
    fn(t)
    save_file(t, str(ad / WEIGHTS_NAME))


def _first_module(cfg) -> str:
    return next(iter(cfg["modules"]))


# ------------------------------------------------------------------------------------------------ weights file
def test_truncated_safetensors(ad):
    data = (ad / WEIGHTS_NAME).read_bytes()
    (ad / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _load_fails(ad, "not a readable safetensors file", file=WEIGHTS_NAME)


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10, b"{\"not\": \"a safetensors header\"}"],
                         ids=["empty", "garbage", "json-text"])
def test_garbage_safetensors(ad, content):
    (ad / WEIGHTS_NAME).write_bytes(content)
    _load_fails(ad, "not a readable safetensors file", file=WEIGHTS_NAME)


def test_tensor_missing(ad):
    _edit_tensors(ad, lambda t: t.pop(sorted(t)[0]))
    _load_fails(ad, r"missing in the file \['model\.", file=WEIGHTS_NAME)


def test_tensor_unexpected(ad):
    _edit_tensors(ad, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.lora_C.weight", torch.zeros(2)))
    _load_fails(ad, r"unexpected in the file \['model\.layers\.0\.self_attn\.q_proj\.lora_C\.weight'\]",
                file=WEIGHTS_NAME)


def test_tensor_wrong_shape(ad):
    def change(t):
        k = sorted(t)[0]
        t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:])
    _edit_tensors(ad, change)
    _load_fails(ad, r"has shape \(\d+, \d+\) in the file but \(\d+, \d+\) in the model", file=WEIGHTS_NAME)


def test_tensor_wrong_dtype(ad):
    k = []

    def change(t):
        k.append(sorted(t)[0])
        t[k[0]] = t[k[0]].half()
    _edit_tensors(ad, change)
    _load_fails(ad, re.escape(f"tensor {k[0]!r} has dtype torch.float16 in the file but torch.float32 in the model"),
                file=WEIGHTS_NAME)


# ------------------------------------------------------------------------------------------------ config file
@pytest.mark.parametrize("text", ["{not json", "", "\u00ff\u00fe".encode("utf-16").decode("latin-1")],
                         ids=["syntax", "empty", "not-utf8"])
def test_config_not_json(ad, text):
    (ad / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    _load_fails(ad, "not a readable JSON file", file=CONFIG_NAME)


def test_config_not_an_object(ad):
    (ad / CONFIG_NAME).write_text("[1, 2, 3]")
    _load_fails(ad, "must hold a JSON object, got a JSON list", file=CONFIG_NAME)


def test_config_without_modules(ad):
    _edit_config(ad, lambda c: c.pop("modules"))
    _load_fails(ad, 'has no "modules" entry', file=CONFIG_NAME)


@pytest.mark.parametrize("modules", [{}, [], "q_proj"], ids=["empty", "list", "string"])
def test_config_modules_not_a_mapping(ad, modules):
    _edit_config(ad, lambda c: c.__setitem__("modules", modules))
    _load_fails(ad, '"modules" must be a non-empty JSON object', file=CONFIG_NAME)


def test_config_wrong_format_and_version(ad):
    _edit_config(ad, lambda c: c.__setitem__("format_version", "one"))
    _load_fails(ad, "format_version must be an integer, got 'one'", file=CONFIG_NAME)
    _edit_config(ad, lambda c: c.__setitem__("format_version", 99))
    _load_fails(ad, "format_version 99 is newer", file=CONFIG_NAME)
    _edit_config(ad, lambda c: c.__setitem__("format", "peft"))
    _load_fails(ad, "is not a pyfastpeft-adapter file", file=CONFIG_NAME)


@pytest.mark.parametrize("key, value, match", [
    ("config", None, '"config" must be a JSON object'),
    ("config", [4, 8], '"config" must be a JSON object'),
    ("class", None, '"class" must be the adapter\'s class name'),
    ("method", 3, '"method" must be a method name'),
    ("builder", "magic", '"builder" must be "method" or "from_config"'),
    ("backend", 7, '"backend" must be null or a backend name'),
], ids=["no-config", "config-list", "no-class", "method-int", "builder", "backend"])
def test_config_module_entry_malformed(ad, key, value, match):
    def change(c):
        entry = c["modules"][_first_module(c)]
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    _edit_config(ad, change)
    _load_fails(ad, re.escape(match), file=CONFIG_NAME)


def test_config_module_entry_not_an_object(ad):
    _edit_config(ad, lambda c: c["modules"].__setitem__(_first_module(c), "lora"))
    _load_fails(ad, "its entry must be a JSON object", file=CONFIG_NAME)


def test_config_names_a_module_the_model_lacks(ad):
    def change(c):
        name = _first_module(c)
        c["modules"]["model.layers.7.self_attn.q_proj"] = c["modules"].pop(name)
    _edit_config(ad, change)
    _load_fails(ad, r"has no module 'model\.layers\.7\.self_attn\.q_proj'; close names: \[", file=CONFIG_NAME)


def test_config_unknown_method_and_bad_settings(ad):
    _edit_config(ad, lambda c: c["modules"][_first_module(c)].__setitem__("method", "dora"))
    _load_fails(ad, "method must be one of", file=CONFIG_NAME)
    _edit_config(ad, lambda c: c["modules"][_first_module(c)].__setitem__("method", "lora"))
    _edit_config(ad, lambda c: c["modules"][_first_module(c)]["config"].__setitem__("r", -2))
    _load_fails(ad, r"failed for module 'model\.layers\.\d\.", file=CONFIG_NAME)


def test_config_class_mismatch(ad):
    _edit_config(ad, lambda c: c["modules"][_first_module(c)].__setitem__("class", "OFTLinear"))
    _load_fails(ad, "built a LoRALinear, the file holds a OFTLinear", file=CONFIG_NAME)


def test_config_module_of_a_type_the_method_does_not_support(ad):
    def change(c):
        name = _first_module(c)
        c["modules"]["model.norm"] = c["modules"].pop(name)
    _edit_config(ad, change)
    _load_fails(ad, r"module 'model\.norm' is a .*RMSNorm, which method 'lora' does not support", file=CONFIG_NAME)


def test_later_module_fails_after_earlier_ones_were_built(ad):
    """The first modules' adapters are built (their base layers frozen) before a later entry fails: undone."""
    def change(c):
        last = list(c["modules"])[-1]
        c["modules"][last]["config"]["r"] = 0
    _edit_config(ad, change)
    _load_fails(ad, "failed for module", file=CONFIG_NAME)


# ------------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method", ALL_METHODS)
def test_failing_load_leaves_model_untouched_for_every_method(tmp_path, method):
    """Each method's adapters are built from the file, then a tensor of the wrong dtype is found: nothing of the
    model changes (a constructor that touched its base layer would show here)."""
    extra = {"tau_init": 0.01} if method == "gated_lora" else {}
    src = inject_case("llama", method, **extra)
    perturb_adapters(src)
    pfp.save_adapter(src, tmp_path, format="pyfastpeft")
    _edit_tensors(tmp_path, lambda t: t.__setitem__(sorted(t)[-1], t[sorted(t)[-1]].double()))
    err = _load_fails(tmp_path, "has dtype torch.float64 in the file but", file=WEIGHTS_NAME)
    assert sorted(load_file(str(tmp_path / WEIGHTS_NAME)))[-1] in str(err)


def test_a_good_load_still_works_after_a_failed_one(ad, saved):
    model = tiny_llama()
    (ad / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(ValueError):
        pfp.load_adapter(model, ad)
    pfp.load_adapter(model, saved)
    assert sum(is_adapter(m) for m in model.modules()) == len(json.loads((saved / CONFIG_NAME).read_text())["modules"])


@pytest.mark.skipif(getattr(pfp.nn, "FilterBlock", None) is None, reason="pfp.nn.FilterBlock: class not landed")
def test_filter_block_entry_errors(tmp_path):
    """SFP's FilterBlock is rebuilt by its own from_config: bad settings and mixed dtypes name the file too."""
    from tests._tiny_models import tiny_vit

    model = tiny_vit().requires_grad_(False)  # as pfp.subtractive.fit(freeze=True) leaves it
    model.blocks[0].mlp = pfp.nn.FilterBlock(192, 192, rank=8, source="Mlp")
    pfp.save_adapter(model, tmp_path, format="pyfastpeft")
    good = (tmp_path / CONFIG_NAME).read_text()
    _edit_config(tmp_path, lambda c: c["modules"]["blocks.0.mlp"]["config"].__setitem__("in_features", -1))
    _load_fails(tmp_path, r"FilterBlock\.from_config failed for module 'blocks\.0\.mlp': in_features must be",
                file=CONFIG_NAME, model=tiny_vit())
    (tmp_path / CONFIG_NAME).write_text(good)
    _edit_tensors(tmp_path, lambda t: t.__setitem__("blocks.0.mlp.bias", t["blocks.0.mlp.bias"].half()))
    _load_fails(tmp_path, r"tensor 'blocks\.0\.mlp\.(bias|weight_down|weight_up)' has dtype", file=WEIGHTS_NAME,
                model=tiny_vit())
