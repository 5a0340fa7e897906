"""Report of the convergence study, the same as ``benchmarks/convergence.py report ...``.

``python benchmarks/plot_convergence.py --inputs benchmarks/results/convergence/ --page benchmarks/results/convergence.md``
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.study

from benchmarks.study.cli import report_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(report_main())
