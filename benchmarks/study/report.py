"""Report of the convergence study: plots and a Markdown page from the run records.

The inputs are bundles (``--bundle``) and folders of them (searched recursively), merged by
:func:`.records.load_study`; the study's definition (:mod:`.definition`) shapes the page. The
page goes to one file, the plots beside it in a folder named after the page.
"""

from __future__ import annotations

from pathlib import Path

from .definition import EDITION, Edition
from .page import build_page
from .plan import make_cells, split_stale
from .plots import draw
from .records import Study, load_study
from .summary import Summary, summarize


def link(path: Path, page: Path) -> str:
    """``path`` as the page should link it: relative when it lies under the page's folder."""
    here = page.parent.resolve()
    target = path.resolve()
    return target.relative_to(here).as_posix() if target.is_relative_to(here) else target.as_posix()


def load_report(inputs: list[str]) -> tuple[Study, Edition, Summary]:
    """The study ``inputs`` hold, as the page sees it: its edition, its runs with those at a
    sweep's former best lr set aside, and their summary (empty without runs)."""
    edition = EDITION
    study = load_study(inputs, edition.number)
    study.runs, study.stale_runs = split_stale(study.runs, make_cells(edition, quick=study.quick))
    summary = summarize(study.runs, edition, quick=study.quick) if study.runs else {}
    return study, edition, summary


def write_report(inputs: list[str], page: Path, plots_dir: Path, argv: list[str]) -> Study:
    """Load ``inputs``, draw the plots into ``plots_dir`` and write the page; ``argv`` is the
    report's command line, for the page's provenance."""
    study, edition, summary = load_report(inputs)
    plots_dir.mkdir(parents=True, exist_ok=True)
    figures = ({name: link(path, page) for name, path in draw(summary, study.runs, plots_dir, edition).items()}
               if summary else {})
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(build_page(study, summary, argv, figures, edition=edition))
    return study
