"""``python -m flotilla.engine.serve MODEL [flags]``: the same as ``flotilla serve``."""

import sys

from flotilla.engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
