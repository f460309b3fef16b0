"""Adapters on disk: :func:`save_adapter` writes a model's adapters, :func:`load_adapter` injects and fills them
into a freshly built base model (or one that already holds them).

Two formats, side by side in one directory:

* **PEFT's** (``adapter_config.json`` + ``adapter_model.safetensors``) for the methods PEFT has (LoRA, OFT,
  PSOFT): ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it, and so do tools that read PEFT
  adapters. :mod:`pyfastpeft.surgery.peft_format` translates.
* **pyfastpeft's** (``pyfastpeft_adapter.json`` + ``pyfastpeft_adapter.safetensors``) for the others (gated
  LoRA, atoms, filter blocks), or for everything with ``format="pyfastpeft"``.

Directories written before format_version 2 (our schema under PEFT's file names) still load.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from pyfastpeft.core.version import __version__
from pyfastpeft.families import modules as _family_modules
from pyfastpeft.surgery import peft_format as pf
from pyfastpeft.surgery import sharding
from pyfastpeft.surgery.injection import (_freeze_all_but_adapters, _replace, _set_modules_to_save, build_adapter,
                                          modules_to_save_of)
from pyfastpeft.surgery.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from pyfastpeft.surgery.match import _close_names
from pyfastpeft.surgery.methods import adapter_state_dict, base_layer_of, is_adapter, method_of

log = logging.getLogger("pyfastpeft")

FORMAT = "pyfastpeft-adapter"
FORMAT_VERSION = 2  # 2: modules_to_save; own file names
WEIGHTS_NAME = "pyfastpeft_adapter.safetensors"
CONFIG_NAME = "pyfastpeft_adapter.json"
FORMATS = ("auto", "peft", "pyfastpeft")
_ALL_NAMES = (CONFIG_NAME, WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)


def _jsonable(cfg: Any, where: str) -> Any:
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_adapter: {where}.adapter_config() is not JSON-serialisable: {e}") from e
    return cfg


def _to_saveable(key: str, t: torch.Tensor) -> torch.Tensor:
    """The one place every tensor passes through on its way to a file: a plain, contiguous CPU tensor, never a
    shard or an empty ZeRO-3 placeholder (``sharding.checked_cpu`` raises naming ``key``)."""
    return sharding.checked_cpu(key, t).contiguous()


def _our_entry(name: str, mod: nn.Module) -> Dict[str, Any]:
    meth = method_of(mod)
    cfg_fn = getattr(mod, "adapter_config", None)
    # a module that replaces what it stands for (SFP's FilterBlock) is rebuilt by its own from_config
    by_config = meth is None and callable(getattr(type(mod), "from_config", None))
    if (meth is None and not by_config) or not callable(cfg_fn):
        raise ValueError(f"save_adapter: module {name!r} ({type(mod).__name__}) has no method in METHODS, "
                         "no from_config() or no adapter_config(); it cannot be rebuilt on load")
    base = base_layer_of(mod)
    return {
        "method": meth, "builder": "from_config" if by_config else "method", "class": type(mod).__name__,
        "base_type": type(base).__name__ if base is not None else None,
        "base_weight_shape": sharding.full_shape(base.weight) if base is not None and hasattr(base, "weight")
        else None,
        "config": _jsonable(cfg_fn(), name),
        "backend": getattr(mod, "backend", None),
    }


def _untracked_trainable(model: nn.Module, adapters, save_names) -> List[str]:
    """Names of parameters that train but that no adapter or module to save would write."""
    mods = dict(model.named_modules())
    covered = {id(t) for _, m in adapters for t in adapter_state_dict(m).values()}
    covered |= {id(t) for n in save_names for t in mods[n].parameters()}
    return [n for n, q in model.named_parameters() if q.requires_grad and id(q) not in covered]


def _write_atomic(out: Path, files: Dict[str, Any]) -> None:
    """Write every file to a temporary folder next to ``out``, then move them in (``os.replace``); stale
    adapter files of the other format are removed last. A failure before the moves leaves ``out`` as it was."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    try:
        for fname, content in files.items():
            if fname.endswith(".safetensors"):
                save_file(content, str(tmp / fname), metadata={"format": "pt", "writer": f"pyfastpeft {__version__}"})
            else:
                (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for fname in files:
            os.replace(tmp / fname, out / fname)
        for fname in _ALL_NAMES:
            if fname not in files and (out / fname).is_file():
                (out / fname).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(model: nn.Module, path, *, format: str = "auto") -> Dict[str, Any]:
    """Write the adapters of ``model`` (and its ``modules_to_save``) to the directory ``path``.

    ``format="auto"``: LoRA, OFT and PSOFT layers in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained``); layers of methods PEFT
    lacks (gated LoRA, atoms, filter blocks) in ours (``pyfastpeft_adapter.json`` +
    ``pyfastpeft_adapter.safetensors``: method, class, base layer, ``adapter_config()`` per module, versions).
    ``"peft"``: PEFT's format only (raises if a layer cannot be written in it); ``"pyfastpeft"``: ours only.

    Files are written under a temporary name and then moved in place; adapter files of the format not
    written are removed from ``path``. Returns ``{file name: the JSON config written}``.

    A sharded model (FSDP2, DeepSpeed ZeRO-3): call it on every rank; the adapter tensors are gathered in full,
    rank 0 writes, and the files equal those of the same model unsharded (``docs/distributed.md``). An unsharded
    model (one process, DDP) is written by whichever process calls this: under DDP call it on rank 0 only.

    Raises:
        ValueError (before anything is written): no adapter; a parameter that trains but would not be saved
        (names listed: add its module to ``modules_to_save`` or freeze it); PEFT's format asked of a layer it
        cannot express, or of two PEFT methods at once, or of layers whose shared options differ.
    """
    sharded = sharding.is_sharded(model)
    with sharding.full_adapters(model):
        meta = _save_adapter(model, path, format=format, write=not sharded or sharding.is_writer())
    if sharded:
        sharding.barrier()  # the files exist on every rank's return
    return meta


def _save_adapter(model: nn.Module, path, *, format: str, write: bool) -> Dict[str, Any]:
    if format not in FORMATS:
        raise ValueError(f"save_adapter: format must be one of {FORMATS}, got {format!r}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_adapter: path {str(out)!r} exists and is not a directory")
    adapters = [(n, m) for n, m in model.named_modules() if is_adapter(m)]
    save_names = modules_to_save_of(model)
    if not adapters and not save_names:
        raise ValueError("save_adapter: the model holds no pyfastpeft adapter layer")
    lost = _untracked_trainable(model, adapters, save_names)
    if lost:
        raise ValueError(f"save_adapter: {len(lost)} trainable parameter(s) would not be saved: {lost[:12]}"
                         f"{' ...' if len(lost) > 12 else ''}; pass modules_to_save=[...] to pfp.inject for "
                         "modules that train fully, or freeze them (requires_grad_(False))")
    peft_part: Dict[str, Tuple] = {}
    ours: List[Tuple[str, nn.Module]] = []
    for name, mod in adapters:
        kind = pf.peft_type_of(mod) if format != "pyfastpeft" else None
        if kind is None:
            if format == "peft":
                raise ValueError(f"save_adapter: format='peft': module {name!r} is a {type(mod).__name__}, a "
                                 "method PEFT does not have; use format='auto' or 'pyfastpeft'")
            ours.append((name, mod))
            continue
        try:
            peft_part[name] = pf.export_entry(mod)
        except pf.NotRepresentable as e:
            raise ValueError(f"save_adapter: module {name!r} cannot be written in PEFT's format: {e}; "
                             "use format='pyfastpeft'") from e
    files: Dict[str, Any] = {}
    kinds = sorted({v[0] for v in peft_part.values()})
    if len(kinds) > 1:
        raise ValueError(f"save_adapter: the model mixes PEFT methods {kinds}; one PEFT adapter directory holds "
                         "one method: use format='pyfastpeft'")
    mods = dict(model.named_modules())
    if peft_part:
        kind = kinds[0]
        base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        try:
            cfg = pf.build_config(kind, {n: (v[1], v[2]) for n, v in peft_part.items()}, save_names, base_name)
        except ValueError as e:
            raise ValueError(f"save_adapter: {e}; use format='pyfastpeft'") from e
        tensors = {f"{pf.PREFIX}{n}.{k}": _to_saveable(f"{n}.{k}", t) for n, v in peft_part.items()
                   for k, t in v[3].items()}
        for n in save_names:
            tensors.update({f"{pf.PREFIX}{n}.{k}": _to_saveable(f"{n}.{k}", t) for k, t in mods[n].state_dict().items()})
        files[PEFT_CONFIG_NAME], files[PEFT_WEIGHTS_NAME] = cfg, tensors
        if ours:
            log.warning("save_adapter: %s in PEFT's format, %d module(s) of methods PEFT lacks (%s) in "
                        "pyfastpeft's; PEFT will load the first part only", kind, len(ours),
                        sorted({type(m).__name__ for _, m in ours}))
    if ours or (save_names and not peft_part):
        tensors = {}
        modules: Dict[str, Any] = {}
        for name, mod in ours:
            modules[name] = _our_entry(name, mod)
            for k, t in adapter_state_dict(mod).items():
                tensors[f"{name}.{k}" if name else k] = _to_saveable(f"{name}.{k}", t)
        own_save = [] if peft_part else save_names
        for n in own_save:
            tensors.update({f"{n}.{k}": _to_saveable(f"{n}.{k}", t) for k, t in mods[n].state_dict().items()})
        files[CONFIG_NAME] = {"format": FORMAT, "format_version": FORMAT_VERSION, "pyfastpeft_version": __version__,
                              "torch_version": torch.__version__, "modules": modules, "modules_to_save": own_save}
        files[WEIGHTS_NAME] = tensors
    if write:  # a sharded model: rank 0 only
        _write_atomic(out, files)
    return {k: v for k, v in files.items() if k.endswith(".json")}


def _from_config(name: str, mod: nn.Module, info: dict, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    """A module that takes the place of ``mod`` (e.g. ``FilterBlock``), in the saved tensors' dtype."""
    cls = _family_modules().get(info["class"])
    if cls is None:
        raise ValueError(f"module {name!r} needs pyfastpeft.nn.{info['class']}, which is not available in this "
                         "install")
    ref = next(iter(list(mod.parameters()) + list(mod.buffers())), None)
    saved = [t for k, t in tensors.items() if k.startswith(name + ".") and t.is_floating_point()]
    dtype = saved[0].dtype if saved else (ref.dtype if ref is not None else None)
    try:
        new = cls.from_config(info["config"], device=ref.device if ref is not None else None, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{info['class']}.from_config failed for module {name!r}: {e}") from e
    new.train(mod.training)
    return new


def _not_sharded(model: nn.Module, name: str) -> None:
    """A new adapter cannot be injected into a sharded model (its base layer holds only a shard)."""
    sharded = sharding.sharding_of(model)
    if sharded:
        raise ValueError(f"module {name!r} holds no adapter and the model is {sharded}-sharded: inject the adapters "
                         "(pfp.inject with the saved settings) before sharding, then load")


def _json_object(path: Path, where: str) -> dict:
    """The JSON object in ``path``; a ValueError naming ``where`` if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is not a readable JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got a JSON {type(data).__name__}")
    return data


def _read_config(cfg_path: Path) -> dict:
    """The JSON config, checked entry by entry; every error names the file and what is wrong."""
    where = f"load_adapter: {str(cfg_path)!r}"
    meta = _json_object(cfg_path, where)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where} is not a {FORMAT} file (format={meta.get('format')!r})")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {version} is newer than this pyfastpeft reads "
                         f"({FORMAT_VERSION}); upgrade pyfastpeft")
    if "modules" not in meta:
        raise ValueError(f"{where} has no \"modules\" entry (the adapted modules and their configs)")
    modules = meta["modules"]
    mts = meta.setdefault("modules_to_save", [])
    if not isinstance(mts, list) or not all(isinstance(n, str) for n in mts):
        raise ValueError(f"{where}: \"modules_to_save\" must be a list of module names, got {mts!r}"[:300])
    if not isinstance(modules, dict) or not (modules or mts):
        raise ValueError(f"{where}: \"modules\" must be a non-empty JSON object (module path -> settings), got "
                         f"{modules!r}"[:300])
    for name, info in modules.items():
        w = f"{where}: module {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{w}: its entry must be a JSON object, got {info!r}"[:300])
        builder = info.get("builder", "method")
        if builder not in ("method", "from_config"):
            raise ValueError(f"{w}: \"builder\" must be \"method\" or \"from_config\", got {builder!r}")
        if not isinstance(info.get("class"), str):
            raise ValueError(f"{w}: \"class\" must be the adapter's class name (a string), got "
                             f"{info.get('class')!r}")
        if builder == "method" and not isinstance(info.get("method"), str):
            raise ValueError(f"{w}: \"method\" must be a method name (a string), got {info.get('method')!r}")
        if not isinstance(info.get("config"), dict):
            raise ValueError(f"{w}: \"config\" must be a JSON object of the adapter's settings, got "
                             f"{info.get('config')!r}"[:300])
        backend = info.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise ValueError(f"{w}: \"backend\" must be null or a backend name, got {backend!r}")
    return meta


def _read_tensors(w_path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(w_path))
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError) on a bad file
        raise ValueError(f"load_adapter: {str(w_path)!r} is not a readable safetensors file (truncated or "
                         f"corrupt?): {type(e).__name__}: {e}") from e


def _find_parts(p: Path) -> List[Tuple[str, Path, Path]]:
    """``[(format, config file, weights file)]`` found at ``p``: ``"peft"`` and/or ``"pyfastpeft"``."""
    if p.is_file():
        if p.name == PEFT_WEIGHTS_NAME:
            p = p.parent
        else:  # a weights file of ours under any name, its config next to it
            return [("pyfastpeft", p.with_suffix(".json"), p)]
    parts = []
    if (p / CONFIG_NAME).is_file() or (p / WEIGHTS_NAME).is_file():
        parts.append(("pyfastpeft", p / CONFIG_NAME, p / WEIGHTS_NAME))
    if (p / PEFT_CONFIG_NAME).is_file() or (p / PEFT_WEIGHTS_NAME).is_file():
        cfg = p / PEFT_CONFIG_NAME
        try:  # pyfastpeft < format 2 wrote its own schema under PEFT's file names
            legacy = cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            legacy = False
        parts.append(("pyfastpeft" if legacy else "peft", cfg, p / PEFT_WEIGHTS_NAME))
    return parts


def _read_peft_config(cfg_path: Path) -> dict:
    where = f"load_adapter: {str(cfg_path)!r}"
    cfg = _json_object(cfg_path, where)
    if "peft_type" not in cfg:
        raise ValueError(f"{where} is neither a PEFT adapter config (no \"peft_type\") nor a {FORMAT} file")
    pf.check_config(cfg, where)
    mts = cfg.get("modules_to_save") or []
    if isinstance(mts, str) or not all(isinstance(n, str) for n in mts):
        raise ValueError(f"{where}: modules_to_save must be a list of module names, got {mts!r}")
    cfg["modules_to_save"] = list(mts)
    return cfg


class _Plan:
    """What a load will do, built and checked before the model is touched."""

    def __init__(self):
        self.built: Dict[str, nn.Module] = {}  # module name -> adapter (new, or the installed one)
        # (where, file key, src, dst, dtype dst takes first: a new adapter holds a PEFT file's dtype, or None)
        self.copies: List[Tuple[str, str, torch.Tensor, torch.Tensor, Optional[torch.dtype]]] = []
        self.save_names: List[str] = []


def _plan_modules_to_save(plan: _Plan, modules, names, tensors: Dict[str, torch.Tensor], keyed, w_path) -> None:
    """``keyed(name)``: ``{state key: file key}`` of module ``name``'s tensors in the file."""
    where = f"load_adapter: {str(w_path)!r}"
    for n in names:
        mod = modules.get(n)
        if mod is None:
            raise ValueError(f"{where}: modules_to_save names {n!r}, which the model lacks; close names: "
                             f"{_close_names(n, modules)}")
        state = mod.state_dict(keep_vars=True)
        got = keyed(n)
        missing, extra = sorted(set(state) - set(got)), sorted(set(got) - set(state))
        if missing or extra:
            raise ValueError(f"{where}: module to save {n!r}: tensors missing in the file {missing[:8]}, "
                             f"unexpected in the file {extra[:8]}")
        for k, fk in got.items():
            plan.copies.append((where, fk, tensors[fk], state[k], None))
        plan.save_names.append(n)


def _plan_ours(plan: _Plan, model, modules, cfg_path: Path, w_path: Path, backend) -> None:
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"load_adapter: expected {cfg_path.name} and {w_path.name} in {str(cfg_path.parent)!r}")
    meta = _read_config(cfg_path)
    tensors = _read_tensors(w_path)
    built: Dict[str, nn.Module] = {}
    try:
        for name, info in meta["modules"].items():
            mod = modules.get(name)
            if mod is None:
                raise ValueError(f"the model has no module {name!r}; close names: {_close_names(name, modules)}")
            if name in plan.built:
                raise ValueError(f"module {name!r} is also in another adapter file of this directory")
            if info.get("builder") == "from_config" and not (is_adapter(mod) and type(mod).__name__ == info["class"]):
                built[name] = _from_config(name, mod, info, tensors)
            elif is_adapter(mod):
                if type(mod).__name__ != info["class"]:
                    raise ValueError(f"module {name!r} holds a {type(mod).__name__}, the file a {info['class']}")
                built[name] = mod
            else:
                _not_sharded(model, name)
                ad = build_adapter(info["method"], mod, name, backend=backend if backend is not None
                                   else info.get("backend"), **info["config"])
                if type(ad).__name__ != info["class"]:
                    raise ValueError(f"module {name!r}: method {info['method']!r} built a "
                                     f"{type(ad).__name__}, the file holds a {info['class']}")
                built[name] = ad
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {str(cfg_path)!r}: {e}") from e
    plan.built.update(built)
    targets: Dict[str, torch.Tensor] = {}
    for name, ad in built.items():
        for k, t in adapter_state_dict(ad).items():
            targets[f"{name}.{k}" if name else k] = t
    mts = meta["modules_to_save"]
    mts_keys = {n: {k[len(n) + 1:]: k for k in tensors if k.startswith(n + ".")} for n in mts}
    in_mts = {k for d in mts_keys.values() for k in d.values()}
    where = f"load_adapter: {str(w_path)!r}"
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets) - in_mts)
    if missing or extra:
        raise ValueError(f"{where}: tensors differ from the model's adapters: missing in the file "
                         f"{missing[:8]}, unexpected in the file {extra[:8]}")
    plan.copies += [(where, k, tensors[k], targets[k], None) for k in targets]
    _plan_modules_to_save(plan, modules, mts, tensors, mts_keys.__getitem__, w_path)


def _plan_peft(plan: _Plan, model, modules, cfg_path: Path, w_path: Path, backend) -> None:
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"load_adapter: expected {cfg_path.name} and {w_path.name} in {str(cfg_path.parent)!r}")
    cfg = _read_peft_config(cfg_path)
    tensors = _read_tensors(w_path)
    kind = cfg["peft_type"]
    method = pf.METHOD[kind]
    where_w = f"load_adapter: {str(w_path)!r}"
    adapters, saved = pf.split_keys(kind, tensors, cfg["modules_to_save"], where_w)
    if not adapters and not saved:
        raise ValueError(f"{where_w} holds no {kind} adapter tensor")
    derived = pf.DERIVED.get(kind, set())
    try:
        for name, keys in adapters.items():
            mod = modules.get(name)
            if mod is None:
                raise ValueError(f"the model has no module {name!r} (from tensor {next(iter(keys.values()))!r}); "
                                 f"close names: {_close_names(name, modules)}")
            if name in plan.built:
                raise ValueError(f"module {name!r} is also in another adapter file of this directory")
            if is_adapter(mod):
                if method_of(mod) != method:
                    raise ValueError(f"module {name!r} holds a {type(mod).__name__}, the file a {kind} adapter")
                ad, new = mod, False
            else:
                _not_sharded(model, name)
                base = mod
                kw = pf.module_kwargs(kind, cfg, name, base, f"load_adapter: {str(cfg_path)!r}")
                ad, new = build_adapter(method, mod, name, backend=backend, **kw), True
            plan.built[name] = ad
            own = adapter_state_dict(ad)
            missing = sorted(set(own) - set(keys) - derived)
            extra = sorted(set(keys) - set(own))
            if missing or extra:
                raise ValueError(f"module {name!r}: the file lacks {missing} / has unexpected {extra} for the "
                                 "adapter its config describes")
            for k, fk in keys.items():
                src, dst = tensors[fk], own[k]
                # PEFT keeps fp32 adapters on a bf16 base by default: a new adapter takes the file's dtype
                retype = new and src.dtype != dst.dtype and src.is_floating_point() and dst.is_floating_point()
                plan.copies.append((where_w, fk, src, dst, src.dtype if retype else None))
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {str(cfg_path)!r}: {e}") from e
    _plan_modules_to_save(plan, modules, [n for n in saved], tensors, saved.__getitem__, w_path)


def load_adapter(model: nn.Module, path, *, backend: Optional[str] = None) -> nn.Module:
    """Load the adapters in the directory ``path`` into ``model``; returns ``model``.

    Reads PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, as written by
    ``PeftModel.save_pretrained`` or by :func:`save_adapter`; LoRA, OFT and PSOFT, no PEFT model built) and
    pyfastpeft's (``pyfastpeft_adapter.json`` + ``.safetensors``), both when both are there; the format(s)
    found are logged at INFO on the ``pyfastpeft`` logger. A Trainer checkpoint directory written with
    :class:`pyfastpeft.integrations.AdapterCallback` is such a directory.

    ``model`` is a freshly built base model (each saved module path holds the plain base layer: the adapter
    is injected with the saved settings) or one that already holds the same adapters. Tensors are copied bit
    for bit (same dtype; a new adapter takes the dtype of a PEFT file's tensors). Everything but the adapters
    and ``modules_to_save`` is frozen, as after :func:`inject`.

    Raises:
        ValueError: naming the file and what is wrong, and with ``model`` untouched (no parameter, buffer,
            ``requires_grad`` flag or submodule changed): files missing, unreadable or truncated
            (safetensors or JSON), a config that is neither format or lacks ``"modules"`` or a module's
            settings, a PEFT option pyfastpeft cannot represent (DoRA, ...), a module the model lacks (with
            close names), a class or method mismatch, an adapter that cannot be built from the saved settings,
            or a tensor missing, unexpected, or of another shape or dtype than the model's (the error names the
            tensor and both).

    A sharded model (FSDP2, DeepSpeed ZeRO-3) must already hold the adapters (inject, then shard): call it on
    every rank; each reads the files and writes its own shards.
    """
    with sharding.full_adapters(model, write_back=True):
        return _load_adapter(model, path, backend=backend)


def _load_adapter(model: nn.Module, path, *, backend: Optional[str] = None) -> nn.Module:
    p = Path(path)
    parts = _find_parts(p)
    if not parts:
        raise ValueError(f"load_adapter: expected {PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME} (PEFT's format) or "
                         f"{CONFIG_NAME} and {WEIGHTS_NAME} (pyfastpeft's) in {str(p)!r}")
    modules = dict(model.named_modules())
    plan = _Plan()
    frozen_before: Dict[int, bool] = {id(q): q.requires_grad for q in model.parameters()}
    try:
        for fmt, cfg_path, w_path in parts:
            (_plan_peft if fmt == "peft" else _plan_ours)(plan, model, modules, cfg_path, w_path, backend)
        for n, (where, k, src, dst, dtype) in enumerate(plan.copies):  # check every tensor before copying any
            if src.dim() == 0 and tuple(dst.shape) == (1,):  # a 0-dim scalar of older files (GatedLoRALinear.tau)
                src = src.reshape(1)
                plan.copies[n] = (where, k, src, dst, dtype)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{where}: tensor {k!r} has shape {tuple(src.shape)} in the file but "
                                 f"{tuple(dst.shape)} in the model")
            if src.dtype != (dtype or dst.dtype):
                raise ValueError(f"{where}: tensor {k!r} has dtype {src.dtype} in the file but {dst.dtype} in the "
                                 "model (tensors are loaded bit for bit: build the model in the saved dtype)")
    except Exception:
        for q in model.parameters():  # constructors froze the base layers: undo
            q.requires_grad_(frozen_before.get(id(q), q.requires_grad))
        raise
    # copy and install
    if plan.save_names:
        _set_modules_to_save(model, plan.save_names)  # keeps the base model's modules for disable_adapters
    with torch.no_grad():
        for _, _, src, dst, dtype in plan.copies:
            if dtype is not None:
                dst.data = dst.data.to(dtype)
            dst.copy_(src)
    _replace(model, {id(modules[n]): ad for n, ad in plan.built.items() if ad is not modules[n]})
    _freeze_all_but_adapters(model)
    log.info("load_adapter: %s from %s", " + ".join(f"{fmt} format ({c.name})" for fmt, c, _ in parts), str(p))
    return model
