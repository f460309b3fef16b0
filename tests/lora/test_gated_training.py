"""Token-selective LoRA trains a tiny transformers Llama (built from a config, nothing downloaded).

The issue's acceptance run, through ``pfp.inject``: with ``λ · pfp.gate_loss(model)`` (λ = 0.2) added to the language-model loss, the
learnable thresholds rise, fewer than 70 % of the tokens keep their LoRA update, and the loss still falls.
The data is synthetic and learnable (arithmetic sequences ``t_k = (t_0 + 3k) mod V``).
"""
import pytest
import torch

import pyfastpeft as pfp

transformers = pytest.importorskip("transformers")

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   initializer_range=0.2)  # frozen outputs of a trained model's size, not init's 0.02
    return transformers.LlamaForCausalLM(cfg)


def test_gate_loss_raises_tau_selects_fewer_tokens_and_loss_falls():
    torch.manual_seed(0)
    model = _tiny_llama()
    # the tests run Triton interpreted, so the layers are pinned to torch; the kernels are checked elsewhere
    pfp.inject(model, "gated_lora", target_modules=list(TARGETS), r=8, alpha=16, backend="torch")
    layers = [m for m in model.modules() if isinstance(m, pfp.nn.GatedLoRALinear)]
    assert len(layers) == 2 * len(TARGETS)
    taus = [layer.tau for layer in layers]
    lora = [p for p in model.parameters() if p.requires_grad and all(p is not t for t in taus)]
    assert len(lora) == 2 * len(layers)  # A and B of each layer; everything else frozen
    opt = torch.optim.AdamW([{"params": lora, "lr": 3e-3}, {"params": taus, "lr": 1e-2}], weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    losses, fractions = [], []
    for _ in range(60):
        ids = (torch.randint(0, 128, (8, 1), generator=gen) + 3 * torch.arange(32)) % 128
        lm_loss = model(input_ids=ids, labels=ids).loss
        loss = lm_loss + 0.2 * pfp.gate_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm_loss.item())
        fractions.append(sum(layer.selected_fraction for layer in layers) / len(layers))
    assert fractions[0] == 1.0  # B = 0 at init: every token selected, the model is the base model
    assert min(t.item() for t in taus) > 0.02, [t.item() for t in taus]
    final_fraction = sum(fractions[-5:]) / 5
    assert final_fraction < 0.7, fractions[-5:]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
