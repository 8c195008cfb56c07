"""``python -m prouie_pl``: see :mod:`prouie_pl.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
