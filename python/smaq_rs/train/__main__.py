"""``python -m smaq_rs.train ...``: the training driver (see :mod:`smaq_rs.train.driver`)."""

import sys

from .driver import main

if __name__ == "__main__":
    sys.exit(main())
