"""``target_modules`` matching with PEFT's meanings.

* a list of names: a module matches when its full dotted name equals an entry or ends with
  ``"." + entry`` (so ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj`` but not ``xq_proj``);
* a string: a regular expression that must match the **full** module name (``re.fullmatch``);
* ``"all-linear"``: every ``nn.Linear`` except the output head. The head is the transformers model's
  ``get_output_embeddings()`` (what PEFT skips); we also skip a timm model's ``get_classifier()`` and,
  without either, a top-level ``score`` / ``classifier`` (PEFT skips those only for ``task_type=SEQ_CLS``).

``exclude_modules`` takes the same list / regex forms and wins over ``target_modules``.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable, List, Optional, Sequence, Union

from torch import nn

from pyfastpeft.surgery.methods import is_adapter

ALL_LINEAR = "all-linear"
# top-level names PEFT treats as a classification head (peft.utils.constants.SEQ_CLS_HEAD_NAMES)
_HEAD_NAMES = ("score", "classifier")

TargetSpec = Union[str, Sequence[str]]


def _name_matches(spec: TargetSpec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def output_head_names(model: nn.Module) -> set:
    """Names of the modules ``"all-linear"`` leaves out (the output / classification head)."""
    named = list(model.named_modules())
    heads: List[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            heads.append(get_out())
        except Exception:  # noqa: BLE001 - models that do not implement it raise NotImplementedError
            pass
    get_cls = getattr(model, "get_classifier", None)  # timm
    if callable(get_cls) and not any(isinstance(h, nn.Module) for h in heads):
        try:
            heads.append(get_cls())
        except Exception:  # noqa: BLE001
            pass
    if not any(isinstance(h, nn.Module) for h in heads):
        heads.extend(getattr(model, n, None) for n in _HEAD_NAMES)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return {n for n, m in named if id(m) in ids}


def _adapter_internal_names(model: nn.Module) -> set:
    """Names inside existing pyfastpeft adapters (their base layers, lora_A, ...): never targets."""
    out = set()
    for prefix, mod in model.named_modules():
        if is_adapter(mod):
            out.update(f"{prefix}.{sub}" if prefix else sub for sub, _ in mod.named_modules() if sub)
    return out


def _close_names(query: str, names: Iterable[str], n: int = 6) -> List[str]:
    names = [x for x in names if x]
    pool = set(names)
    for x in names:  # suffixes at module-name boundaries: "q_proj", "self_attn.q_proj", ...
        parts = x.split(".")
        pool.update(".".join(parts[i:]) for i in range(1, len(parts)))
    close = difflib.get_close_matches(query, sorted(pool), n=n, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(query, sorted(pool), n=n, cutoff=0.2)
    return close


def match_modules(model: nn.Module, target_modules: TargetSpec,
                  exclude_modules: Optional[TargetSpec] = None) -> List[str]:
    """Names of the modules ``target_modules`` selects (PEFT's meanings; see the module docstring).

    Raises ``ValueError`` for a pattern (or a list entry) that matches no module, listing close names.
    """
    if target_modules is None:
        raise ValueError("target_modules is required: a list of module-name suffixes, a regex string, or "
                         f"{ALL_LINEAR!r}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be a non-empty list of non-empty strings, a regex string or "
                             f"{ALL_LINEAR!r}, got {target_modules!r}")
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        exclude_modules = list(exclude_modules)
    internal = _adapter_internal_names(model)
    names = [n for n, _ in model.named_modules() if n and n not in internal]
    modules = dict(model.named_modules())
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        hits = [n for n in names if isinstance(modules[n], nn.Linear) and n not in heads]
        if not hits:
            raise ValueError(f"target_modules={ALL_LINEAR!r}: the model has no nn.Linear layer outside its "
                             f"output head ({sorted(heads) or 'none'})")
    elif isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from None
        hits = [n for n in names if re.fullmatch(target_modules, n)]
        if not hits:
            raise ValueError(f"target_modules regex {target_modules!r} matches no module name (re.fullmatch on "
                             f"the full dotted name); close names: {_close_names(target_modules, names)}")
    else:
        hits = [n for n in names if _name_matches(target_modules, n)]
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            hint = "; ".join(f"{t!r}: close names {_close_names(t, names)}" for t in unmatched)
            raise ValueError(f"target_modules entries match no module name (suffixes at '.' boundaries): {hint}")
    if exclude_modules:
        kept = [n for n in hits if not _name_matches(exclude_modules, n)]
        if not kept:
            raise ValueError(f"exclude_modules={exclude_modules!r} removes every module target_modules selected "
                             f"({len(hits)}: {hits[:6]}{' ...' if len(hits) > 6 else ''})")
        hits = kept
    return hits
