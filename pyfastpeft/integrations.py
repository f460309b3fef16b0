"""Hugging Face ``Trainer`` without subclassing: :class:`AdapterCallback`.

::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[pfp.integrations.AdapterCallback()])

With the callback, every checkpoint (and ``trainer.save_model()``) holds the adapter only, written by
:func:`pyfastpeft.save_adapter` (PEFT's format for LoRA/OFT/PSOFT: ``PeftModel.from_pretrained(base, checkpoint)``
loads it; ours for the other methods), never the base model; ``pfp.load_adapter(model, checkpoint)`` reads it;
``trainer.train(resume_from_checkpoint=...)`` restores the adapter (and ``modules_to_save``) bit for bit; and
``gate_weight=λ`` adds ``λ · pfp.gate_loss(model)`` to the training loss of a gated-LoRA model, without a custom
``compute_loss``.

How: at ``Trainer.__init__`` the callback replaces the model's ``save_pretrained`` (on that instance only) by an
adapter writer, and registers a forward hook that adds the gate regulariser to ``outputs.loss`` in training mode.
For resuming, the checkpoint also gets ``model.safetensors.index.json`` (the Trainer's sharded-checkpoint index)
pointing every key of the model at ``pyfastpeft_resume.safetensors``, which holds the trained tensors only under
the model's own key names: the Trainer's loader restores them and leaves the frozen base weights as they are.
There is no ``config.json``: ``AutoModel.from_pretrained(checkpoint)`` stops with an error instead of building
a model of random layers; load the base model, then ``pfp.load_adapter``.
"""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Optional

from torch import nn
from transformers import TrainerCallback

from pyfastpeft.surgery.adapters import _to_saveable, save_adapter
from pyfastpeft.surgery.injection import modules_to_save_of
from pyfastpeft.surgery.methods import adapter_state_dict, is_adapter

RESUME_NAME = "pyfastpeft_resume.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME


def trained_state_dict(model: nn.Module) -> dict:
    """The adapters' and ``modules_to_save``' tensors under ``model.state_dict()``'s key names."""
    mods = dict(model.named_modules())
    out = {}
    for name, mod in mods.items():
        if is_adapter(mod):
            out.update({f"{name}.{k}" if name else k: t for k, t in adapter_state_dict(mod).items()})
    for n in modules_to_save_of(model):
        out.update({f"{n}.{k}": t for k, t in mods[n].state_dict(keep_vars=True).items()})
    return out


def _adapter_save_pretrained(model: nn.Module, format: str):
    def save_pretrained(self, save_directory, state_dict=None, is_main_process: bool = True, **kwargs):
        """pyfastpeft: writes the adapter only (``pfp.save_adapter``) and a resume index for the Trainer."""
        if not is_main_process:
            return
        from safetensors.torch import save_file

        out = Path(save_directory)
        save_adapter(self, out, format=format)
        tensors = {k: _to_saveable(k, t) for k, t in trained_state_dict(self).items()}
        save_file(tensors, str(out / RESUME_NAME), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                              "note": "pyfastpeft adapter checkpoint: only the trained tensors are stored; the "
                                      "frozen base weights are the model's own"},
                 "weight_map": {k: RESUME_NAME for k in self.state_dict()}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    return types.MethodType(save_pretrained, model)


class AdapterCallback(TrainerCallback):
    """Adapter-only checkpoints, resume, and the gated-LoRA regulariser for ``transformers.Trainer``.

    Args:
        gate_weight: ``λ``; ``> 0`` adds ``λ · pfp.gate_loss(model)`` to ``outputs.loss`` of every training
            forward (the model must hold ``GatedLoRALinear`` layers). ``0`` (default): nothing added.
        format: ``save_adapter``'s ``format`` (``"auto"``, ``"peft"``, ``"pyfastpeft"``).
    """

    def __init__(self, gate_weight: float = 0.0, format: str = "auto"):
        from pyfastpeft.core.checks import check_scalar

        self.gate_weight = float(check_scalar("gate_weight", gate_weight))
        if self.gate_weight < 0:
            raise ValueError(f"gate_weight must be >= 0, got {gate_weight!r}")
        if format not in ("auto", "peft", "pyfastpeft"):
            raise ValueError(f"format must be 'auto', 'peft' or 'pyfastpeft', got {format!r}")
        self.format = format
        self._hook = None

    def on_init_end(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if model is None:
            raise ValueError("AdapterCallback: the Trainer passed no model")
        if not any(is_adapter(m) for m in model.modules()) and not modules_to_save_of(model):
            raise ValueError("AdapterCallback: the model holds no pyfastpeft adapter; call pfp.inject first")
        model.save_pretrained = _adapter_save_pretrained(model, self.format)
        if self.gate_weight > 0 and self._hook is None:
            from pyfastpeft.lora.modules import gate_loss

            gate_loss(model)  # raises now (not mid-training) when the model has no gated layer
            lam = self.gate_weight

            def add_gate_loss(module, inputs, output):
                loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
                if module.training and loss is not None:
                    output["loss"] = loss + lam * gate_loss(module).to(loss.dtype)
                return output

            self._hook = model.register_forward_hook(add_gate_loss)
        return control


__all__ = ["AdapterCallback", "trained_state_dict", "RESUME_NAME", "INDEX_NAME"]
