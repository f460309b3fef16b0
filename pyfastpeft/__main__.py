"""``python -m pyfastpeft ...``: the same command line as ``pyfastpeft ...``."""
import sys

from pyfastpeft.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
