"""``python -m fastopt``: the same as the ``fastopt`` command (see :mod:`fastopt.cli`)."""
import sys

from .cli import main

sys.exit(main())
