"""``python -m fastcl.train``: the built-in demo without arguments, else one training run."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
