"""Hugging Face ``Trainer`` with ``pfp.integrations.AdapterCallback`` (no subclass): adapter-only checkpoints
that ``pfp.load_adapter`` and ``PeftModel.from_pretrained`` read, bit-exact resume, and the gated regulariser.
Tiny Llama built from a config, a few CPU steps; nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.surgery import PEFT_WEIGHTS_NAME, WEIGHTS_NAME
from pyfastpeft.testing import assert_rel_close
from tests._tiny_models import VOCAB, example_input, logits, perturb_adapters, tiny_llama

transformers = pytest.importorskip("transformers")
integrations = pytest.importorskip("pyfastpeft.integrations")


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, VOCAB, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(method="lora"):
    kw = dict(r=4, alpha=8) if method == "lora" else dict(r=4, alpha=8, tau_init=0.01)
    return pfp.inject(tiny_llama(), method, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                      backend="torch", **kw)


def _trainer(model, out, **cb):
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=100,
                                          seed=0, data_seed=0, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                callbacks=[integrations.AdapterCallback(**cb)])


def _trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_hold_the_adapter_and_resume_bit_exact(tmp_path):
    model = _model()
    _trainer(model, tmp_path / "run").train()
    ck2, ck4 = tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"
    names = {p.name for p in ck4.iterdir()}
    # the adapter only: no base weights, and no config.json that from_pretrained could build random layers from
    assert PEFT_WEIGHTS_NAME in names and "model.safetensors" not in names and "config.json" not in names
    assert sum(p.stat().st_size for p in ck4.glob("*.safetensors")) < 100_000
    x = example_input("llama")
    model.eval()
    # pfp.load_adapter reads a checkpoint directory, bit for bit
    fresh = pfp.load_adapter(tiny_llama(), ck4, backend="torch")
    with torch.no_grad():
        assert torch.equal(logits(fresh, x), logits(model, x))
    # PEFT reads it too (the trained head included)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), ck4)
    with torch.no_grad():
        assert_rel_close("PEFT on the checkpoint", logits(pm.eval(), x), logits(model, x))
    # resume from step 2 reaches step 4's adapter exactly
    again = _model()
    _trainer(again, tmp_path / "resume").train(resume_from_checkpoint=str(ck2))
    want, got = _trained(model), _trained(again)
    assert set(want) == set(got)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_gate_weight_adds_the_regulariser_to_the_training_loss(tmp_path):
    model = _model("gated_lora")
    perturb_adapters(model)  # B != 0: at B = 0 every ratio is 0 and the gate loss is 0 by design
    _trainer(model, tmp_path, gate_weight=0.5)  # installs the hook at Trainer.__init__
    batch = _Data()[0]
    ids, labels = batch["input_ids"][None], batch["labels"][None]
    model.train()
    with_reg = model(input_ids=ids, labels=labels).loss
    gate = pfp.gate_loss(model)
    model.eval()
    plain = model(input_ids=ids, labels=labels).loss  # eval: nothing added
    assert gate.item() > 0
    assert_rel_close("training loss", with_reg, plain + 0.5 * gate)
    with pytest.raises(ValueError, match="gate_loss: the model has no GatedLoRALinear"):
        _trainer(_model(), tmp_path, gate_weight=0.5)


def test_gated_checkpoint_in_our_format(tmp_path):
    model = _model("gated_lora")
    _trainer(model, tmp_path, gate_weight=0.1).train()
    ck = tmp_path / "checkpoint-4"
    assert (ck / WEIGHTS_NAME).is_file()
    fresh = pfp.load_adapter(tiny_llama(), ck, backend="torch")
    x = example_input("llama")
    with torch.no_grad():
        assert torch.equal(logits(fresh, x), logits(model.eval(), x))


class _Labels(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(12)
        self.ids = torch.randint(0, VOCAB, (n, 10), generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.y[i]}


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_bert_classifier_head_travels_with_the_checkpoint(tmp_path):
    peft = pytest.importorskip("peft")
    model = pfp.inject(_bert(), "lora", target_modules=["query", "value"], modules_to_save=["classifier"], r=4,
                       alpha=8, backend="torch")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2, learning_rate=1e-2,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=_Labels(),
                         callbacks=[integrations.AdapterCallback()]).train()
    head = model.classifier.weight.detach().clone()
    assert not torch.equal(head, _bert().classifier.weight)  # the head trained
    ck = tmp_path / "checkpoint-2"
    x = _Labels().ids[:2]
    model.eval()
    fresh = pfp.load_adapter(_bert(), ck, backend="torch")
    assert torch.equal(fresh.classifier.weight, head)
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert torch.equal(fresh(input_ids=x).logits, want)
        assert_rel_close("PEFT on the BERT checkpoint", peft.PeftModel.from_pretrained(_bert(), ck).eval()(
            input_ids=x).logits, want)
