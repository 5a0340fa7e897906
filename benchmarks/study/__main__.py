"""``python -m benchmarks.study ...`` (from the repository root): the same as ``benchmarks/convergence.py``."""

import sys

from .cli import main

sys.exit(main())
