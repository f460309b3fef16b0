"""Tiny models built from configs (nothing downloaded) and the per-method cases of the ecosystem tests.

Every method of ``pfp.surgery.METHODS`` has a case; one whose ``pfp.nn`` class is not in this install is
skipped with the reason "class not landed" (and runs as soon as the class is there).
"""
from __future__ import annotations

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.surgery import METHODS

VOCAB = 128

# constructor kwargs per method, valid for every layer the targets below select
METHOD_KWARGS = {
    "lora": dict(r=4, alpha=8),
    "gated_lora": dict(r=4, alpha=8),
    "oft": dict(block_size=8),
    "psoft": dict(r=4, alpha=8),
    "atoms": dict(num_atoms=4, block=8),
}
# target_modules per model; atoms also takes the ViT's patch-embedding conv
TARGETS = {
    "llama": {m: ["q_proj", "v_proj", "down_proj"] for m in METHODS},
    "vit": {**{m: ["qkv", "fc2"] for m in METHODS}, "atoms": ["qkv", "fc2", "patch_embed.proj"]},
}


def missing_classes(method: str) -> list[str]:
    return [c.__name__ for c in METHODS[method].classes() if getattr(pfp.nn, c.__name__, None) is None]


def method_param(method: str):
    """``pytest.param(method)``, skipped only while the method's ``pfp.nn`` class is absent."""
    missing = missing_classes(method)
    marks = [pytest.mark.skip(reason=f"pfp.nn.{', '.join(missing)}: class not landed")] if missing else []
    return pytest.param(method, marks=marks, id=method)


ALL_METHODS = [method_param(m) for m in METHODS]


def tiny_llama(seed: int = 0, *, intermediate: int = 128):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_vit(seed: int = 0, *, num_classes: int = 10):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=num_classes).eval()


def build(kind: str, seed: int = 0):
    return tiny_llama(seed) if kind == "llama" else tiny_vit(seed)


def example_input(kind: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "llama":
        return torch.randint(0, VOCAB, (batch, 11), generator=g)
    return torch.randn(batch, 3, 32, 32, generator=g)


def logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def inject_case(kind: str, method: str, seed: int = 0, **extra):
    """A tiny model of ``kind`` with ``method`` injected on the torch backend (fast on CPU)."""
    model = build(kind, seed)
    return pfp.inject(model, method, target_modules=TARGETS[kind][method], backend="torch",
                      **{**METHOD_KWARGS[method], **extra})


@torch.no_grad()
def perturb_adapters(model, seed: int = 3, scale: float = 0.1) -> None:
    """Random values in every adapter parameter (B = 0 at init hides the update; never test with zeros)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if pfp.surgery.is_adapter(mod):
            for name, t in pfp.surgery.adapter_state_dict(mod).items():
                if isinstance(t, torch.nn.Parameter) and t.is_floating_point() and name != "tau":
                    t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * scale)
