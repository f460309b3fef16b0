"""The layout's rules, checked on the source: one home per family, arrows that point one way, a core that
imports no family, tools apart, and every document the code or README cites present in the repository."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "pyfastpeft"
KERNELS = ROOT / "triton_kernels"


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("pyfastpeft", "triton_kernels") + path.relative_to(KERNELS).with_suffix("").parts
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [p for p in list(PKG.rglob("*.py")) + list(KERNELS.rglob("*.py")) if "__pycache__" not in p.parts]
    return {_module_name(p): p for p in files}


SOURCES = _sources()


def _imports(name: str) -> set[str]:
    """Every module of ours that ``name`` imports, at module level or inside a function."""
    path = SOURCES[name]
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in SOURCES else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in SOURCES and t != name)
    return out


GRAPH = {name: _imports(name) for name in SOURCES}


def _family_names() -> list[str]:
    from pyfastpeft.families import FAMILIES

    return list(FAMILIES)


def test_no_import_cycles():
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        color[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if color.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in color:
                visit(m)
        stack.pop()
        color[n] = 2

    for n in sorted(GRAPH):
        if n not in color:
            visit(n)


def _ours(deps: set[str], prefix: str) -> list[str]:
    return sorted(d for d in deps if d == prefix or d.startswith(prefix + "."))


@pytest.mark.parametrize("family", _family_names())
def test_family_rules(family):
    fam = f"pyfastpeft.{family}"
    ref = f"{fam}.reference"
    assert ref in SOURCES, f"{family} has no fp64 reference module"
    assert not _ours(GRAPH[ref], "pyfastpeft"), f"{ref} must import nothing of ours, imports {GRAPH[ref]}"
    mods = f"{fam}.modules"
    assert ref not in GRAPH.get(mods, set()), f"{mods} imports the reference"
    torch_impls = {n for n in SOURCES if n.startswith(fam + ".torch_")}
    assert torch_impls, f"{family} has no torch implementation (pyfastpeft/{family}/torch_*.py)"
    for n in SOURCES:
        if n.startswith("pyfastpeft.triton_kernels."):
            bad = GRAPH[n] & torch_impls
            assert not bad, f"Triton kernels {n} import the torch implementation {sorted(bad)}"
    assert (ROOT / "tests" / family).is_dir(), f"tests/{family}/ is missing"


def test_references_import_nothing_of_ours_and_modules_no_reference():
    for n in SOURCES:
        if n.endswith(".reference") and n != "pyfastpeft.reference":
            assert not _ours(GRAPH[n], "pyfastpeft"), n
        if n.endswith(".modules"):
            assert not [d for d in GRAPH[n] if d.endswith(".reference")], n


def test_core_imports_no_family_and_library_no_tools():
    families = {f"pyfastpeft.{f}" for f in _family_names()} | {"pyfastpeft.families", "pyfastpeft.surgery"}
    for n, deps in GRAPH.items():
        if n.startswith("pyfastpeft.core"):
            bad = [d for d in deps if any(d == f or d.startswith(f + ".") for f in families)]
            assert not bad, f"core module {n} imports {bad}"
        if not n.startswith("pyfastpeft.tools") and n != "pyfastpeft.__main__":  # the entry point runs the CLI
            assert not _ours(deps, "pyfastpeft.tools"), f"library module {n} imports the tools"


def test_top_level_holds_only_public_faces():
    top = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 5, top


def test_import_loads_no_tool_no_plot_no_kernel():
    code = ("import sys, pyfastpeft; bad = [m for m in sys.modules if m.startswith(('pyfastpeft.tools', "
            "'matplotlib', 'pyfastpeft.triton_kernels.')) and not m.endswith('_cost')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_family_is_declared_once_and_has_its_folders():
    from pyfastpeft import families as F

    names = [f.name for f in F.families()]
    assert names == _family_names() and len(set(names)) == len(names)
    for f in F.families():
        assert (PKG / f.name / "__init__.py").is_file()
        assert (ROOT / f.doc).is_file(), f.doc
        for k in f.kernels:
            assert k in SOURCES, k
            assert k.startswith(f"pyfastpeft.triton_kernels.{f.name}."), k
        for b in f.benchmarks:
            assert (ROOT / b).is_file(), b
        if f.twins:
            assert (ROOT / "csrc" / f.name).is_dir(), f"{f.name} declares CUDA twin checks but has no csrc/{f.name}/"
    ops = [op.name for f in F.families() for op in f.ops]
    assert len(ops) == len(set(ops)), ops


_CITE = re.compile(r"\b((?:docs|specs)/[A-Za-z0-9_.\-/]+\.md)")


def _texts():
    for p in list(PKG.rglob("*.py")) + list(KERNELS.rglob("*.py")) + list((ROOT / "benchmarks").rglob("*.py")):
        yield p, p.read_text()
    for p in [ROOT / "README.md", ROOT / "ENV.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]:
        if p.is_file():
            text = p.read_text()
            if p.name == "adding-a-method.md":  # its example declares a family that does not exist
                text = re.sub(r"```.*?```", "", text, flags=re.S)
            yield p, text
    for p in (ROOT / "csrc").rglob("*"):
        if p.suffix in (".cu", ".cuh", ".cpp", ".h"):
            yield p, p.read_text()


def test_every_cited_document_exists():
    missing = []
    for path, text in _texts():
        for cite in _CITE.findall(text):
            if cite.startswith("specs/") or not (ROOT / cite).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {cite}")
    assert not missing, "cited documents that are not in the repository:\n" + "\n".join(missing)


def test_cli_help_cites_only_existing_documents():
    out = subprocess.run([sys.executable, "-m", "pyfastpeft", "--help"], capture_output=True, text=True, cwd=ROOT)
    helps = out.stdout
    for sub in ("info", "check", "bench", "demo", "compile-report"):
        helps += subprocess.run([sys.executable, "-m", "pyfastpeft", sub, "--help"], capture_output=True, text=True,
                                cwd=ROOT).stdout
    assert "usage" in helps
    for cite in _CITE.findall(helps):
        assert (ROOT / cite).is_file(), cite


def test_old_names_never_shadow_new_modules():
    from pyfastpeft._compat import MOVED

    for old, new in MOVED.items():
        assert old not in SOURCES, f"{old} is both an old alias and a module of the tree"
        assert new in SOURCES, f"{old} points to {new}, which does not exist"
