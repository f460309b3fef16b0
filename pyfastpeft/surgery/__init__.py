"""Model surgery: put pyfastpeft adapters into a whole model, take them out, and convert PEFT models.

``inject(model, method, target_modules=...)`` replaces the matching layers in place by the method's
``pfp.nn`` module and freezes everything else; ``target_modules`` has PEFT's meanings:

* a list of names: a module matches when its full dotted name equals an entry or ends with
  ``"." + entry`` (so ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj`` but not ``xq_proj``);
* a string: a regular expression that must match the **full** module name (``re.fullmatch``);
* ``"all-linear"``: every ``nn.Linear`` except the output head. The head is the transformers model's
  ``get_output_embeddings()`` (what PEFT skips); we also skip a timm model's ``get_classifier()`` and,
  without either, a top-level ``score`` / ``classifier`` (PEFT skips those only for ``task_type=SEQ_CLS``).

``exclude_modules`` takes the same list / regex forms and wins over ``target_modules``.

The methods (:data:`METHODS`) and the PEFT layers ``from_peft`` converts come from the table of families
(:func:`pyfastpeft.families.methods`); an adapter is an instance of a family's layer class
(:func:`pyfastpeft.families.modules`). Every adapter module provides ``adapter_config()`` (kwargs that rebuild
it with its constructor) and keeps its frozen base layer as a child; :func:`adapter_state_dict` is what
belongs to the adapter, not the base.

One module per concern, each importing only those before it:

* :mod:`~pyfastpeft.surgery.methods`: the method table, :func:`is_adapter`, :func:`adapter_state_dict`;
* :mod:`~pyfastpeft.surgery.match`: ``target_modules`` matching;
* :mod:`~pyfastpeft.surgery.injection`: :func:`build_adapter`, :func:`inject`, freezing, :func:`summary`;
* :mod:`~pyfastpeft.surgery.merge`: :func:`merge_and_unload`, :func:`unload`, :func:`disable_adapters`;
* :mod:`~pyfastpeft.surgery.peft`: :func:`from_peft`;
* :mod:`~pyfastpeft.surgery.peft_format`: PEFT's adapter format (config and key names), no ``peft`` import;
* :mod:`~pyfastpeft.surgery.adapters`: :func:`save_adapter`, :func:`load_adapter` (adapter files);
* :mod:`~pyfastpeft.surgery.sharding`: FSDP2 / ZeRO-3 models (gathering, saving, merging; imported by
  ``merge`` and ``adapters``, importing only ``methods`` and ``injection``).
"""
from __future__ import annotations

from pyfastpeft.core.family import Builder, Method
from pyfastpeft.surgery.adapters import (CONFIG_NAME, FORMAT, FORMAT_VERSION, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME,
                                         WEIGHTS_NAME, load_adapter, save_adapter)
from pyfastpeft.surgery.injection import Summary, build_adapter, inject, log, summary  # noqa: F401 (log: the old name)
from pyfastpeft.surgery.match import ALL_LINEAR, TargetSpec, match_modules, output_head_names
from pyfastpeft.surgery.merge import disable_adapters, merge_and_unload, unload
from pyfastpeft.surgery.methods import (METHODS, adapter_state_dict, available_methods, base_layer_of, is_adapter,
                                        method_of)
from pyfastpeft.surgery.peft import from_peft
from pyfastpeft.surgery import sharding  # noqa: E402 (FSDP2 / ZeRO-3 helpers)
from pyfastpeft.surgery.sharding import full_state_dict, is_sharded

__all__ = ["ALL_LINEAR", "TargetSpec", "Builder", "Method", "METHODS", "available_methods", "method_of",
           "is_adapter", "base_layer_of", "adapter_state_dict", "output_head_names", "match_modules",
           "build_adapter", "inject", "Summary", "summary", "merge_and_unload", "unload", "disable_adapters",
           "from_peft", "FORMAT",
           "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PEFT_CONFIG_NAME", "save_adapter",
           "load_adapter", "sharding", "is_sharded", "full_state_dict"]
