"""Old import paths keep working (``pyfastpeft._compat``): every module that moved into a family package, the
core or the tools is importable under its old name, as the very same module object, with a
``DeprecationWarning`` that names the new path (``pyfastpeft.perf`` is a public name: silent).

The old names are imported in one fresh interpreter (after ``import pyfastpeft``, as a user would), so that
each is a first import there: a name that the library itself still imports, or that an installed module
already holds, shows up as "no warning" or "another module" instead of being hidden by this test session.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyfastpeft._compat import MOVED

SILENT = {"pyfastpeft.perf"}  # a public name (``pfp.perf``): importing it never warns
ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent("""
    import importlib, json, sys, warnings
    import pyfastpeft
    from pyfastpeft._compat import MOVED
    out = {}
    for old, new in MOVED.items():
        entry = {"preloaded": old in sys.modules}
        try:
            new_mod = importlib.import_module(new)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                old_mod = importlib.import_module(old)
            entry["same"] = old_mod is new_mod
            entry["old_file"] = getattr(old_mod, "__file__", None)
            entry["new_file"] = getattr(new_mod, "__file__", None)
            entry["deprecations"] = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        except Exception as e:  # reported per entry by the test
            entry["error"] = f"{type(e).__name__}: {e}"
        out[old] = entry
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def imported():
    """old name -> what importing it did in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("old, new", sorted(MOVED.items()), ids=[old for old in sorted(MOVED)])
def test_old_path_is_the_new_module(imported, old, new):
    entry = imported[old]
    assert "error" not in entry, f"import {old}: {entry['error']}"
    assert entry["same"], (f"import {old} gave {entry['old_file']}, not the module {new} ({entry['new_file']})"
                           + (" (the name was already in sys.modules after `import pyfastpeft`)"
                              if entry["preloaded"] else ""))


@pytest.mark.parametrize("old, new", sorted(MOVED.items()), ids=[old for old in sorted(MOVED)])
def test_old_path_warns_with_the_new_path(imported, old, new):
    entry = imported[old]
    assert "error" not in entry, f"import {old}: {entry['error']}"
    if old in SILENT:
        assert entry["deprecations"] == [], f"{old} is a public name: no DeprecationWarning, got {entry['deprecations']}"
        return
    assert any(old in msg and new in msg for msg in entry["deprecations"]), (
        f"import {old}: no DeprecationWarning naming {new} (got {entry['deprecations']}"
        + ("; the name was already imported by `import pyfastpeft`)" if entry["preloaded"] else ")"))


def test_public_names_still_work():
    import pyfastpeft as pfp
    from pyfastpeft.lora.modules import LoRALinear
    from pyfastpeft.lora.reference import lora_linear_ref as new_ref
    from pyfastpeft.reference import lora_linear_ref

    assert pfp.nn.LoRALinear is LoRALinear
    assert lora_linear_ref is new_ref
