"""pytest configuration for ``benchmarks/`` (not collected by the default ``pytest`` run)."""
import os
import sys

# `import shapes` works whatever pytest's import mode is
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
