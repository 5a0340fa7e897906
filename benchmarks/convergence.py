"""Convergence study of Magma against other optimizers: the command line.

The study lives in ``benchmarks/study/`` (usage: ``benchmarks/study/cli.py``); its results are
``benchmarks/results/convergence2.md``. ``python benchmarks/convergence.py --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.study, magma_ext

from benchmarks.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
