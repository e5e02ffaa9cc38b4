"""``python -m dpfl``: the ``dpfl`` command line (``dpfl.cli.main``)."""

import sys

from dpfl.cli import main

if __name__ == "__main__":
    sys.exit(main())
