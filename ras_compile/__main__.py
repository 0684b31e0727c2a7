"""``python -m ras_compile``: the ``ras-compile`` command line (see :mod:`ras_compile.cli`)."""
import sys

from .cli import main

sys.exit(main())
