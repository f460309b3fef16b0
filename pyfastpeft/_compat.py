"""Old import paths keep working: modules moved into their family packages, the core and the tools.

``import pyfastpeft.ops.lora_linear`` (say) imports ``pyfastpeft.lora.lora_linear`` and registers it under
the old name too, with a ``DeprecationWarning`` that names the new path. Public names
(``pfp.<op>``, ``pfp.nn.*``, ``pfp.reference.*``, ``pfp.perf``) never warn.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

# old module path -> new module path
MOVED: dict[str, str] = {
    "pyfastpeft._alloc": "pyfastpeft.core.alloc",
    "pyfastpeft._backend": "pyfastpeft.core.backend",
    "pyfastpeft._check_atoms": "pyfastpeft.atoms.checks",
    "pyfastpeft._check_gram": "pyfastpeft.subtractive.checks",
    "pyfastpeft._check_orthogonal": "pyfastpeft.orthogonal.checks",
    "pyfastpeft._ext": "pyfastpeft.core.ext",
    "pyfastpeft._twin": "pyfastpeft.core.twin",
    "pyfastpeft.bench": "pyfastpeft.tools.bench",
    "pyfastpeft.check": "pyfastpeft.tools.check",
    "pyfastpeft.cli": "pyfastpeft.tools.cli",
    "pyfastpeft.compile_report": "pyfastpeft.tools.compile_report",
    "pyfastpeft.demo": "pyfastpeft.tools.demo",
    "pyfastpeft.fallback.atoms": "pyfastpeft.atoms.torch_impl",
    "pyfastpeft.fallback.gated_lora_linear": "pyfastpeft.lora.torch_gated",
    "pyfastpeft.fallback.gram_accumulate": "pyfastpeft.subtractive.torch_impl",
    "pyfastpeft.fallback.lora_linear": "pyfastpeft.lora.torch_impl",
    "pyfastpeft.fallback.orthogonal": "pyfastpeft.orthogonal.torch_impl",
    "pyfastpeft.nn.atoms": "pyfastpeft.atoms.modules",
    "pyfastpeft.nn.filter_block": "pyfastpeft.subtractive.modules",
    "pyfastpeft.nn.gated_lora": "pyfastpeft.lora.modules",
    "pyfastpeft.nn.lora": "pyfastpeft.lora.modules",
    "pyfastpeft.nn.orthogonal": "pyfastpeft.orthogonal.modules",
    "pyfastpeft.ops.atoms": "pyfastpeft.atoms.ops",
    "pyfastpeft.ops.cayley": "pyfastpeft.orthogonal.cayley",
    "pyfastpeft.ops.gated_lora_linear": "pyfastpeft.lora.gated_lora_linear",
    "pyfastpeft.ops.gram_accumulate": "pyfastpeft.subtractive.gram_accumulate",
    "pyfastpeft.ops.lora_linear": "pyfastpeft.lora.lora_linear",
    "pyfastpeft.ops.oft_linear": "pyfastpeft.orthogonal.oft_linear",
    "pyfastpeft.ops.psoft_linear": "pyfastpeft.orthogonal.psoft_linear",
    "pyfastpeft.perf": "pyfastpeft.tools.perf",
    "pyfastpeft.reference.atoms": "pyfastpeft.atoms.reference",
    "pyfastpeft.reference.gated_lora_linear": "pyfastpeft.lora.reference",
    "pyfastpeft.reference.gram_accumulate": "pyfastpeft.subtractive.reference",
    "pyfastpeft.reference.lora_linear": "pyfastpeft.lora.reference",
    "pyfastpeft.reference.orthogonal": "pyfastpeft.orthogonal.reference",
    "pyfastpeft.report": "pyfastpeft.tools.report",
    "pyfastpeft.triton_kernels._atoms_cost": "pyfastpeft.triton_kernels.atoms._atoms_cost",
    "pyfastpeft.triton_kernels._cayley_cost": "pyfastpeft.triton_kernels.orthogonal._cayley_cost",
    "pyfastpeft.triton_kernels._config": "pyfastpeft.core.triton_config",
    "pyfastpeft.triton_kernels._gated_lora_linear_cost": "pyfastpeft.triton_kernels.lora._gated_lora_linear_cost",
    "pyfastpeft.triton_kernels._gram_accumulate_cost": "pyfastpeft.triton_kernels.subtractive._gram_accumulate_cost",
    "pyfastpeft.triton_kernels._lora_linear_cost": "pyfastpeft.triton_kernels.lora._lora_linear_cost",
    "pyfastpeft.triton_kernels.cayley": "pyfastpeft.triton_kernels.orthogonal.cayley",
    "pyfastpeft.triton_kernels.gated_lora_linear": "pyfastpeft.triton_kernels.lora.gated_lora_linear",
    "pyfastpeft.triton_kernels.gram_accumulate": "pyfastpeft.triton_kernels.subtractive.gram_accumulate",
    "pyfastpeft.triton_kernels.lora_linear": "pyfastpeft.triton_kernels.lora.lora_linear",
    "pyfastpeft.triton_kernels.oft_linear": "pyfastpeft.triton_kernels.orthogonal.oft_linear",
    "pyfastpeft.triton_trace": "pyfastpeft.tools.triton_trace",
}
# old packages that held only moved modules
_OLD_PACKAGES = ("pyfastpeft.ops", "pyfastpeft.fallback")
# old paths that are public names: no warning
_SILENT = ("pyfastpeft.perf",)


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str | None):
        self.target = target

    def create_module(self, spec):
        if self.target is None:  # an old package: an empty namespace for its old submodules
            mod = types.ModuleType(spec.name)
            mod.__path__ = []
            return mod
        if spec.name not in _SILENT:
            warnings.warn(f"{spec.name} moved to {self.target}; import it from there", DeprecationWarning,
                          stacklevel=4)
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:  # an old name is never a new module's name (a test checks it)
            return importlib.machinery.ModuleSpec(fullname, _Loader(MOVED[fullname]))
        if fullname in _OLD_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, _Loader(None), is_package=True)
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
