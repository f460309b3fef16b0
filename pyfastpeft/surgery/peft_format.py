"""PEFT's own adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) for LoRA, OFT and PSOFT.

Written so that ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it, and read without building a
PEFT model (no ``peft`` import). Key names are PEFT's: ``base_model.model.<module>.lora_A.weight`` (the adapter
name removed, as PEFT saves them), ``...oft_R.weight``, ``...psoft_R.{weight,vector_a,vector_b}``, and a
``modules_to_save`` module's own state at ``base_model.model.<module>.<key>``.

Everything here is pure translation: :func:`export_entry` turns one of our adapter layers into PEFT's config
options and tensors (or says why it cannot), :func:`read_config` checks a PEFT config and returns, per module,
the method and constructor kwargs that rebuild it with ours.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT key suffix -> our adapter_state_dict key, per peft_type
KEYS: Dict[str, Dict[str, str]] = {
    "LORA": {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight", "lora_B.bias": "lora_B.bias"},
    "OFT": {"oft_R.weight": "oft_v"},
    "PSOFT": {"psoft_R.weight": "psoft_v", "psoft_R.vector_a": "vector_a", "psoft_R.vector_b": "vector_b"},
}
METHOD = {"LORA": "lora", "OFT": "oft", "PSOFT": "psoft"}
# our adapter keys that PEFT does not store but recomputes from the base weight (PSOFT's SVD factors)
DERIVED = {"PSOFT": {"psoft_a", "psoft_b"}}


class NotRepresentable(ValueError):
    """One of our layers has a setting PEFT's format cannot express."""


def peft_type_of(module: nn.Module) -> Optional[str]:
    """``"LORA"``, ``"OFT"`` or ``"PSOFT"`` for a layer PEFT has (exact class), else ``None``."""
    from pyfastpeft.lora.modules import LoRAConv2d, LoRALinear
    from pyfastpeft.orthogonal.modules import OFTLinear, PSOFTLinear

    return {LoRALinear: "LORA", LoRAConv2d: "LORA", OFTLinear: "OFT", PSOFTLinear: "PSOFT"}.get(type(module))


def export_entry(module: nn.Module) -> Tuple[str, Dict[str, Any], Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(peft_type, shared options, per-module options, {PEFT key suffix: tensor})`` of one of our layers.

    Raises :class:`NotRepresentable` (naming the setting) for a layer PEFT's config cannot express.
    """
    kind = peft_type_of(module)
    if kind is None:
        raise NotRepresentable(f"{type(module).__name__} is not a method PEFT has")
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Conv2d) and kind == "LORA":
        if tuple(base.dilation) != (1, 1) or base.padding_mode != "zeros":
            raise NotRepresentable(f"PEFT's LoRA Conv2d has no dilation or padding mode for lora_A (the conv has "
                                   f"dilation={tuple(base.dilation)}, padding_mode={base.padding_mode!r})")
    elif not isinstance(base, nn.Linear):
        raise NotRepresentable(f"the base layer is a {type(base).__name__}")
    if kind == "LORA":
        import math

        want = module.alpha / (math.sqrt(module.r) if module.use_rslora else module.r)
        if not math.isclose(module.scaling, want, rel_tol=1e-12):
            raise NotRepresentable(f"scaling {module.scaling:g} is neither alpha/r nor alpha/sqrt(r)")
        shared = {"lora_dropout": module.dropout, "use_rslora": module.use_rslora, "lora_bias": module.lora_bias,
                  "bias": "none", "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True}
        per = {"r": module.r, "lora_alpha": module.alpha}
        t = {"lora_A.weight": module.lora_A.weight, "lora_B.weight": module.lora_B.weight}
        if module.lora_bias:
            t["lora_B.bias"] = module.lora_B.bias
        return kind, shared, per, t
    if kind == "OFT":
        if module.method == "exact" and module.convention != "minus":
            raise NotRepresentable("method='exact' with convention='plus' (PEFT's exact Cayley is 'minus')")
        shared = {"oft_block_size": module.block_size, "r": 0, "use_cayley_neumann": module.method == "neumann",
                  "num_cayley_neumann_terms": module.terms, "coft": module.coft, "eps": module.eps,
                  "block_share": module.block_share, "module_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                  "init_weights": True}
        return kind, shared, {}, {"oft_R.weight": module.oft_v}
    # PSOFT
    if abs(module.scaling - module.alpha / module.r) > 1e-12 * abs(module.scaling):
        raise NotRepresentable(f"scaling {module.scaling:g} is not alpha/r")
    shared = {"r": module.r, "psoft_alpha": module.alpha, "ab_svd_init": module.init, "psoft_svd": module.svd,
              "psoft_svd_lowrank_niter": module.niter, "random_seed": module.seed, "psoft_mag_a": module.mag_a,
              "psoft_mag_b": module.mag_b, "use_cayley_neumann": module.method == "neumann",
              "num_cayley_neumann_terms": module.terms, "cayley_neumann_eps": module.eps, "psoft_orth": True,
              "psoft_dropout": 0.0, "fan_in_fan_out": False, "init_weights": True}
    t = {"psoft_R.weight": module.psoft_v}
    if module.vector_a is not None:
        t["psoft_R.vector_a"] = module.vector_a
    if module.vector_b is not None:
        t["psoft_R.vector_b"] = module.vector_b
    return kind, shared, {}, t


def build_config(kind: str, entries: Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]],
                 modules_to_save: List[str], base_model_name: Optional[str]) -> Dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the modules ``entries`` (name -> (shared, per-module options)).

    Shared options must agree across modules (PEFT has one value per adapter); LoRA's ``r`` / ``lora_alpha``
    may differ (PEFT's ``rank_pattern`` / ``alpha_pattern``, keyed by the escaped full module name).
    """
    names = sorted(entries)
    first_shared = entries[names[0]][0]
    for n in names[1:]:
        for k, v in entries[n][0].items():
            if first_shared.get(k) != v:
                raise ValueError(f"modules {names[0]!r} and {n!r} differ in {k} ({first_shared.get(k)!r} vs {v!r}), "
                                 f"which PEFT's {kind} config holds once per adapter")
    cfg: Dict[str, Any] = {"peft_type": kind, "task_type": None, "base_model_name_or_path": base_model_name,
                           "inference_mode": True, "target_modules": names,
                           "modules_to_save": list(modules_to_save) or None, **first_shared}
    if kind == "LORA":
        rs = [entries[n][1]["r"] for n in names]
        alphas = [entries[n][1]["lora_alpha"] for n in names]
        r0 = max(set(rs), key=rs.count)
        a0 = max(set(alphas), key=alphas.count)
        cfg["r"], cfg["lora_alpha"] = r0, a0
        cfg["rank_pattern"] = {_exact(n): r for n, r in zip(names, rs) if r != r0}
        cfg["alpha_pattern"] = {_exact(n): a for n, a in zip(names, alphas) if a != a0}
    return cfg


def _exact(name: str) -> str:
    """A rank/alpha pattern key that PEFT (``re.match(rf"(.*\\.)?({key})$", name)``) matches to ``name`` only."""
    return "^" + re.escape(name)


def _pattern(patterns: Dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern key matching the end of ``name`` (after a dot)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


# options of each PEFT config we read and how a value we cannot represent is recognised: name -> ok(value)
_OK_NONE = (lambda v: v in (None, {}, [], "", False))
_UNSUPPORTED: Dict[str, Dict[str, Any]] = {
    "LORA": {"use_dora": _OK_NONE, "fan_in_fan_out": _OK_NONE, "bias": (lambda v: v in (None, "none")),
             "target_parameters": _OK_NONE, "alora_invocation_tokens": _OK_NONE, "use_qalora": _OK_NONE,
             "use_bdlora": _OK_NONE, "trainable_token_indices": _OK_NONE, "layer_replication": _OK_NONE,
             "megatron_config": _OK_NONE, "arrow_config": _OK_NONE, "monteclora_config": _OK_NONE,
             "velora_config": _OK_NONE,
             "init_lora_weights": (lambda v: isinstance(v, bool) or v == "gaussian")},
    "OFT": {"fan_in_fan_out": _OK_NONE, "bias": (lambda v: v in (None, "none")),
            "module_dropout": (lambda v: not v)},
    "PSOFT": {"fan_in_fan_out": _OK_NONE, "psoft_orth": (lambda v: v in (None, True)),
              "psoft_dropout": (lambda v: not v)},
}


def check_config(cfg: Dict[str, Any], where: str) -> str:
    """The ``peft_type`` of a PEFT config we can read; ValueError (``where`` names the file) otherwise."""
    kind = cfg.get("peft_type")
    if kind not in METHOD:
        raise ValueError(f"{where}: peft_type {kind!r} is not one pyfastpeft reads (LORA, OFT, PSOFT); convert the "
                         "PEFT model with pfp.from_peft(..., merge_unsupported=True) instead")
    for opt, ok in _UNSUPPORTED[kind].items():
        if opt in cfg and not ok(cfg[opt]):
            raise ValueError(f"{where}: {kind} option {opt}={cfg[opt]!r} cannot be represented by pyfastpeft"
                             + (" (DoRA is not supported yet)" if opt == "use_dora" else ""))
    return kind


def module_kwargs(kind: str, cfg: Dict[str, Any], name: str, base: nn.Module, where: str) -> Dict[str, Any]:
    """Our constructor kwargs that rebuild module ``name`` of a PEFT ``kind`` config (PEFT's defaults for
    options the file leaves out)."""
    g = cfg.get
    if kind == "LORA":
        return {"r": int(_pattern(g("rank_pattern") or {}, name, g("r", 8))),
                "alpha": float(_pattern(g("alpha_pattern") or {}, name, g("lora_alpha", 8))),
                "dropout": float(g("lora_dropout") or 0.0), "use_rslora": bool(g("use_rslora", False)),
                "lora_bias": bool(g("lora_bias", False))}
    if kind == "OFT":
        b, r = int(g("oft_block_size") or 0), int(g("r") or 0)
        if b == 0 and r:
            k = getattr(base, "in_features", None)
            if not k or k % r:
                raise ValueError(f"{where}: OFT r={r} does not divide the in_features of module {name!r}")
            b = k // r
        if b == 0:
            raise ValueError(f"{where}: OFT config has neither oft_block_size nor r")
        neumann = bool(g("use_cayley_neumann", True))
        return {"block_size": b, "method": "neumann" if neumann else "exact", "convention": "minus",
                "terms": int(g("num_cayley_neumann_terms", 5)), "coft": bool(g("coft", False)),
                "eps": float(g("eps", 6e-5)), "block_share": bool(g("block_share", False))}
    neumann = bool(g("use_cayley_neumann", False))
    eps = g("cayley_neumann_eps")
    return {"r": int(g("r", 32)), "alpha": float(g("psoft_alpha", 32)), "method": "neumann" if neumann else "exact",
            "terms": int(g("num_cayley_neumann_terms", 5)), "eps": None if eps is None or not neumann else float(eps),
            "vectors": (bool(g("psoft_mag_a", True)), bool(g("psoft_mag_b", True))), "svd": g("psoft_svd", "full"),
            "init": g("ab_svd_init", "psoft_init"), "seed": int(g("random_seed", 0)),
            "niter": int(g("psoft_svd_lowrank_niter", 10))}


def split_keys(kind: str, keys, modules_to_save: List[str], where: str):
    """``({module: {our key: file key}}, {modules_to_save module: {state key: file key}})`` of a PEFT file's keys.

    A key of neither kind raises a ValueError naming it.
    """
    adapters: Dict[str, Dict[str, str]] = {}
    saved: Dict[str, Dict[str, str]] = {}
    suffixes = KEYS[kind]
    for fk in keys:
        k = fk[len(PREFIX):] if fk.startswith(PREFIX) else fk
        for suf, ours in suffixes.items():
            if k.endswith("." + suf):
                adapters.setdefault(k[: -len(suf) - 1], {})[ours] = fk
                break
        else:
            owner = next((m for m in _prefixes(k) if any(m == s or m.endswith("." + s) for s in modules_to_save)),
                         None)
            if owner is None:
                raise ValueError(f"{where}: tensor {fk!r} is neither a {kind} adapter tensor nor part of a module in "
                                 f"modules_to_save {modules_to_save}")
            saved.setdefault(owner, {})[k[len(owner) + 1:]] = fk
    return adapters, saved


def _prefixes(key: str) -> List[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
