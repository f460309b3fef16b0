"""Adapters on disk: :func:`save_adapter` writes a model's adapters (safetensors + a JSON config),
:func:`load_adapter` injects and fills them into a freshly built base model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from pyfastpeft.core.version import __version__
from pyfastpeft.families import modules as _family_modules
from pyfastpeft.surgery import sharding
from pyfastpeft.surgery.injection import _freeze_all_but_adapters, _replace, build_adapter
from pyfastpeft.surgery.match import _close_names
from pyfastpeft.surgery.methods import adapter_state_dict, base_layer_of, is_adapter, method_of

FORMAT = "pyfastpeft-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _jsonable(cfg: Any, where: str) -> Any:
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_adapter: {where}.adapter_config() is not JSON-serialisable: {e}") from e
    return cfg


def save_adapter(model: nn.Module, path) -> Dict[str, Any]:
    """Write the adapters of ``model`` to the directory ``path``: ``adapter_model.safetensors`` (adapter
    parameters and buffers, at their full module path) and ``adapter_config.json`` (method, class, base
    layer type and shape, ``adapter_config()`` per module, pyfastpeft/torch versions). Returns the JSON dict.

    A sharded model (FSDP2, DeepSpeed ZeRO-3): call it on every rank; the adapter tensors are gathered in full,
    rank 0 writes, and the files equal those of the same model unsharded (``docs/distributed.md``). An unsharded
    model (one process, DDP) is written by whichever process calls this: under DDP call it on rank 0 only.
    """
    sharded = sharding.is_sharded(model)
    with sharding.full_adapters(model):
        meta = _save_adapter(model, path, write=not sharded or sharding.is_writer())
    if sharded:
        sharding.barrier()  # the files exist on every rank's return
    return meta


def _save_adapter(model: nn.Module, path, write: bool = True) -> Dict[str, Any]:
    from safetensors.torch import save_file

    out = Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    modules: Dict[str, Any] = {}
    for name, mod in model.named_modules():
        if not is_adapter(mod):
            continue
        meth = method_of(mod)
        cfg_fn = getattr(mod, "adapter_config", None)
        # a module that replaces what it stands for (SFP's FilterBlock) is rebuilt by its own from_config
        by_config = meth is None and callable(getattr(type(mod), "from_config", None))
        if (meth is None and not by_config) or not callable(cfg_fn):
            raise ValueError(f"save_adapter: module {name!r} ({type(mod).__name__}) has no method in METHODS, "
                             "no from_config() or no adapter_config(); it cannot be rebuilt on load")
        base = base_layer_of(mod)
        modules[name] = {
            "method": meth, "builder": "from_config" if by_config else "method", "class": type(mod).__name__,
            "base_type": type(base).__name__ if base is not None else None,
            "base_weight_shape": sharding.full_shape(base.weight) if base is not None and hasattr(base, "weight")
            else None,
            "config": _jsonable(cfg_fn(), name),
            "backend": getattr(mod, "backend", None),
        }
        for k, t in adapter_state_dict(mod).items():
            key = f"{name}.{k}" if name else k
            tensors[key] = sharding.checked_cpu(key, t)  # never a shard or an empty ZeRO-3 placeholder
    if not modules:
        raise ValueError("save_adapter: the model holds no pyfastpeft adapter layer")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "pyfastpeft_version": __version__,
            "torch_version": torch.__version__, "modules": modules}
    if write:  # a sharded model: rank 0 only
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT, "pyfastpeft": __version__})
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return meta


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


def _read_config(cfg_path: Path) -> dict:
    """The JSON config, checked entry by entry; every error names the file and what is wrong."""
    where = f"load_adapter: {str(cfg_path)!r}"
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is not a readable JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{where} must hold a JSON object, got a JSON {type(meta).__name__}")
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
    if not isinstance(modules, dict) or not modules:
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


def load_adapter(model: nn.Module, path, *, backend: Optional[str] = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; returns ``model``.

    ``model`` is a freshly built base model (each saved module path holds the plain base layer: the adapter
    is injected with the saved ``adapter_config``) or one that already holds the same adapters. Tensors are
    copied bit for bit (same dtype). Everything but the adapters is frozen, as after :func:`inject`.

    Raises:
        ValueError: naming the file and what is wrong, and with ``model`` untouched (no parameter, buffer,
            ``requires_grad`` flag or submodule changed): files missing, unreadable or truncated
            (safetensors or JSON), a config that is not a pyfastpeft adapter config or lacks ``"modules"``
            or a module's settings, a module the model lacks (with close names), a class or method mismatch,
            an adapter that cannot be built from the saved settings, or a tensor missing, unexpected, or of
            another shape or dtype than the model's adapter (the error names the tensor and both).

    A sharded model (FSDP2, DeepSpeed ZeRO-3) must already hold the adapters (inject, then shard): call it on
    every rank; each reads the file and writes its own shards.
    """
    with sharding.full_adapters(model, write_back=True):
        return _load_adapter(model, path, backend=backend)


def _load_adapter(model: nn.Module, path, *, backend: Optional[str] = None) -> nn.Module:
    p = Path(path)
    cfg_path, w_path = (p / CONFIG_NAME, p / WEIGHTS_NAME) if p.is_dir() else (p.with_suffix(".json"), p)
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"load_adapter: expected {CONFIG_NAME} and {WEIGHTS_NAME} in {str(p)!r}")
    meta = _read_config(cfg_path)
    tensors = _read_tensors(w_path)
    modules = dict(model.named_modules())
    sharded = sharding.sharding_of(model)
    # 1. build (not install) each adapter, or reuse an installed one of the same class
    built: Dict[str, nn.Module] = {}
    frozen_before: Dict[int, bool] = {id(q): q.requires_grad for q in model.parameters()}
    try:
        try:
            for name, info in meta["modules"].items():
                mod = modules.get(name)
                if mod is None:
                    raise ValueError(f"the model has no module {name!r}; close names: "
                                     f"{_close_names(name, modules)}")
                if info.get("builder") == "from_config" and not (is_adapter(mod) and
                                                                 type(mod).__name__ == info["class"]):
                    built[name] = _from_config(name, mod, info, tensors)
                elif is_adapter(mod):
                    if type(mod).__name__ != info["class"]:
                        raise ValueError(f"module {name!r} holds a {type(mod).__name__}, the file a {info['class']}")
                    built[name] = mod
                else:
                    if sharded:
                        raise ValueError(f"module {name!r} holds no adapter and the model is {sharded}-sharded: "
                                         "inject the adapters (pfp.inject with the saved settings) before sharding, "
                                         "then load")
                    ad = build_adapter(info["method"], mod, name, backend=backend if backend is not None
                                       else info.get("backend"), **info["config"])
                    if type(ad).__name__ != info["class"]:
                        raise ValueError(f"module {name!r}: method {info['method']!r} built a "
                                         f"{type(ad).__name__}, the file holds a {info['class']}")
                    built[name] = ad
        except (TypeError, ValueError) as e:
            raise ValueError(f"load_adapter: {str(cfg_path)!r}: {e}") from e
        # 2. check every tensor before copying any
        targets: Dict[str, torch.Tensor] = {}
        for name, ad in built.items():
            for k, t in adapter_state_dict(ad).items():
                targets[f"{name}.{k}" if name else k] = t
        missing = sorted(set(targets) - set(tensors))
        extra = sorted(set(tensors) - set(targets))
        where = f"load_adapter: {str(w_path)!r}"
        if missing or extra:
            raise ValueError(f"{where}: tensors differ from the model's adapters: missing in the file "
                             f"{missing[:8]}, unexpected in the file {extra[:8]}")
        for k, src in tensors.items():
            dst = targets[k]
            if src.dim() == 0 and tuple(dst.shape) == (1,):  # a 0-dim scalar of older files (GatedLoRALinear.tau)
                tensors[k] = src = src.reshape(1)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{where}: tensor {k!r} has shape {tuple(src.shape)} in the file but "
                                 f"{tuple(dst.shape)} in the model")
            if src.dtype != dst.dtype:
                raise ValueError(f"{where}: tensor {k!r} has dtype {src.dtype} in the file but {dst.dtype} in the "
                                 "model (tensors are loaded bit for bit: build the model in the saved dtype)")
    except Exception:
        for q in model.parameters():  # constructors froze the base layers: undo
            q.requires_grad_(frozen_before.get(id(q), q.requires_grad))
        raise
    # 3. copy and install
    with torch.no_grad():
        for k, src in tensors.items():
            targets[k].copy_(src)
    _replace(model, {id(modules[n]): ad for n, ad in built.items() if ad is not modules[n]})
    _freeze_all_but_adapters(model)
    return model
