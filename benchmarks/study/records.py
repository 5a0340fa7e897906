"""The records of the study: the JSON bundles that the runner writes and the report reads.

Every invocation writes one bundle (``--bundle``), rewritten after every record::

    {"kind": "bundle", "meta": META, "runs": [RUN, ...], "throughput": [THROUGHPUT, ...],
     "skipped": [{"id": RUN_ID, "reason": "..."}, ...]}

RUN: one training run. ``id`` is :func:`run_id`; ``size``, ``optimizer``, ``lr``, ``seed``,
``stage`` ("sweep", "best_lr" or "transfer"), ``tier``, ``lr_rule`` (how a best-lr or transfer run
chose its lr: "best", "S-best", "S-best+1"), ``lr_note``, the budget (``steps``, ``batch_size``,
``seq_len``, ``tokens``, ``eval_every``, ``eval_batches``, ``final_eval_batches``, ``model``,
``dtype``, ``compile``), ``optimizer_description``, ``magma_fused``, ``status`` ("ok",
"diverged" or "error"), ``error``, ``wall_s``, ``train_time_s``, ``eval_time_s``, ``warmup_s``,
``timed_steps``, ``resumed_at`` (steps at which it went on from a checkpoint); a finished run adds
``final_train_loss``, ``final_val_loss``, ``final_val_ppl``, ``ms_per_step``, ``tokens_per_s``,
``peak_mem_bytes``, ``num_parameters``, ``passes`` (how often it read its training bytes; absent
in records older than that field, which read them once at most), ``window_order_sha1`` (of the
order it read its training windows in: one for all runs of one size and seed on one corpus;
absent in older records) and the curves ``train_loss`` / ``val_loss`` (``[step, loss]`` pairs,
:func:`curve`); then ``edition``, ``command``, ``date``,
``env`` and ``data`` of its invocation, ``data`` describing the corpus (:func:`.corpus.describe`):
file list and content SHA-1. Older records also hold ``gpu`` and ``side_by_side``.

THROUGHPUT: one optimizer's step timing of ``--mode throughput`` (size, optimizer, tokens_per_s,
step_ms, step_ms_windows, opt_step_ms_median, opt_step_ms_min, state_bytes, peak_mem_bytes,
``measurement``: the invocation's META date, shared by the rows timed side by side, ...).

META: ``command``, ``date`` (:func:`now_utc`), ``mode`` ("sweep" or "throughput"), ``edition``,
``quick``, ``env``, ``data``; a sweep adds ``time_budget_s``, ``sizes``, ``optimizers`` (name ->
lrs, description), ``weight_decay``, ``betas``, ``muon_adamw_lr_ratio``, ``planned_runs``,
``resumed_from``, ``tiers``, ``compile`` and, when the invocation ends, ``aggregate`` (tokens
trained, wall seconds, tokens/s per GPU). Older metas also hold ``shard``/``num_shards``,
``parallel`` and ``gpus``.

Several invocations make one study: :func:`load_study` merges bundles and folders of them, one
record per run id, and :func:`merged_meta` merges their set-ups. A size's runs count only on one
corpus (:func:`study_corpora`): the corpus is built from the machine's installed files, so another
machine image trains and validates on other bytes. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SECTIONS = ("runs", "throughput", "skipped")


def run_id(size: str, optimizer: str, lr: float | None, seed: int, rule: str | None = None) -> str:
    """A run's id; ``lr`` None names a run before its learning rate is known by the rule that
    will choose it ("best" unless told: the best of the size's seed-0 sweep)."""
    return f"{size}__{optimizer}__lr{(rule or 'best') if lr is None else f'{lr:g}'}__seed{seed}"


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def curve(points) -> list[list[float]]:
    """``[step, loss]`` pairs as stored: integer steps, losses to five decimals."""
    return [[int(step), round(float(loss), 5)] for step, loss in points]


# ---------------------------------------------------------------------------- writing


def write_json(path: Path, obj) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


class BundleWriter:
    """Rewrites the one ``bundle`` file after every record, so a run killed midway still leaves
    everything finished so far."""

    def __init__(self, bundle: Path, meta: dict):
        self.bundle = bundle
        self.contents = {"kind": "bundle", "meta": meta, **{section: [] for section in SECTIONS}}
        bundle.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, section: str, record: dict) -> None:
        self.contents[section].append(record)
        self.flush()

    def set_meta(self, key: str, value) -> None:
        """Add ``key`` to the bundle's meta (what is known only at the end, say)."""
        self.contents["meta"][key] = value
        self.flush()

    def flush(self) -> None:
        write_json(self.bundle, self.contents)


# ---------------------------------------------------------------------------- reading


# A run that ended so is not run again by --resume; "error" is (a crash, an out-of-memory, ...).
FINISHED = ("ok", "diverged")


def load_finished(paths: list[Path]) -> list[dict]:
    """The finished ("ok" or "diverged") run records of earlier bundles, for --resume."""
    records = []
    for path in paths:
        records += [r for r in json.loads(path.read_text())["runs"] if r["status"] in FINISHED]
    return records


def corpus_of(record: dict) -> str | None:
    """The content SHA-1 of the corpus a run or invocation trained on (``data``); None for one
    that names none (a throughput invocation)."""
    return (record.get("data") or {}).get("content_sha1")


Corpora = dict[str, str]  # size -> the content SHA-1 of the corpus its runs count on


def on_corpora(records: list[dict], corpora: Corpora) -> tuple[list[dict], list[dict]]:
    """(the run records trained on their size's corpus in ``corpora``, or naming none, the
    others): runs on another corpus have another validation set, so their perplexities compare
    with none of the study's. Each size has its own corpus (a larger size may need more bytes)."""
    keep, drop = [], []
    for r in records:
        (keep if same_corpus(corpus_of(r), corpora.get(r["size"])) else drop).append(r)
    return keep, drop


def same_corpus(corpus: str | None, content_sha1: str | None) -> bool:
    """Whether records naming ``corpus`` belong with those on ``content_sha1`` (None: unknown)."""
    return corpus is None or content_sha1 is None or corpus == content_sha1


def study_corpora(runs: list[dict]) -> Corpora:
    """Each size's corpus: the one most of its finished runs trained on (a tie goes to the one
    used last). The corpus is built from the machine's installed files, so a machine of another
    image builds another one."""
    counts: dict[str, dict[str, list]] = {}
    for r in runs:
        if corpus_of(r) and r["status"] in FINISHED:
            entry = counts.setdefault(r["size"], {}).setdefault(corpus_of(r), [0, ""])
            entry[0] += 1
            entry[1] = max(entry[1], r.get("date", ""))
    return {size: max(found, key=lambda c: tuple(found[c])) for size, found in counts.items()}


@dataclass
class Study:
    """Everything the inputs hold, runs de-duplicated by id."""

    runs: list[dict] = field(default_factory=list)
    throughput: list[dict] = field(default_factory=list)
    metas: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    corpora: Corpora = field(default_factory=dict)  # the corpus each size's runs count on
    other_corpus_runs: list[dict] = field(default_factory=list)  # runs on another corpus: left out
    stale_runs: list[dict] = field(default_factory=list)  # best-lr runs at a sweep's former best (the report's)

    @property
    def quick(self) -> bool:
        """Whether these are records of the ``--quick`` smoke test (its tiny sizes and grids)."""
        return any(m.get("quick") for m in self.metas if m.get("mode") == "sweep")

    def admits(self, corpus: str | None) -> bool:
        """Whether an invocation that trained on ``corpus`` belongs to the study (its set-up, its skips)."""
        return corpus is None or not self.corpora or corpus in self.corpora.values()


def bundle_files(paths: list[str]) -> list[Path]:
    """The JSON files among ``paths``, folders searched recursively."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def load_study(paths: list[str], edition: int) -> Study:
    """Bundles and folders of them (searched recursively) as one study; ValueError for a bundle
    of another ``edition`` than the study's. A run found twice counts once, a finished copy over
    a failed one; a skipped run that another input finished is no longer skipped (a best-lr or
    transfer run by its rule's id too), and one that several invocations skipped counts once,
    with the reason of the newest (by its bundle's date, whatever the order of the inputs). Only
    runs on their size's corpus (:func:`study_corpora`) count; the others are kept aside in
    ``other_corpus_runs``, and so are the set-ups of invocations that trained on another corpus."""
    run_records, skipped, throughput, study = [], [], {}, Study()
    for path in bundle_files(paths):
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(obj, dict) or obj.get("kind") != "bundle":
            continue  # not a record of this study
        meta = obj.get("meta", {})
        if meta.get("edition") != edition:
            raise ValueError(f"{path} holds records of edition {meta.get('edition', 1)}, not {edition}: edition 1's "
                             "code was removed after commit 30d8086 (its page stays as it was)")
        study.metas.append(meta)
        skipped += [(meta.get("date") or "", corpus_of(meta), entry) for entry in obj.get("skipped", [])]
        run_records += obj.get("runs", [])
        for r in obj.get("throughput", []):
            throughput[(r["size"], r["optimizer"], r.get("date"))] = r
    study.corpora = study_corpora(run_records)
    run_records, study.other_corpus_runs = on_corpora(run_records, study.corpora)
    study.metas = [m for m in study.metas if study.admits(corpus_of(m))]
    runs = {}
    for r in run_records:
        if r["id"] not in runs or (runs[r["id"]]["status"] != "ok" and r["status"] == "ok"):
            runs[r["id"]] = r
    study.runs = list(runs.values())
    study.throughput = list(throughput.values())
    done = set(runs) | {run_id(r["size"], r["optimizer"], None, r["seed"], r.get("lr_rule") or "best")
                        for r in study.runs if r["stage"] != "sweep"}  # skipped before their lr was known
    newest = {}  # a run skipped by several invocations keeps the newest one's reason
    for _, corpus, s in sorted(skipped, key=lambda entry: entry[0]):
        if s["id"] not in done and study.admits(corpus):
            newest[s["id"]] = s
    study.skipped = list(newest.values())
    return study


def sweep_metas(metas: list[dict]) -> list[dict]:
    """The set-ups of the sweep invocations, in date order."""
    return sorted((m for m in metas if m.get("mode") == "sweep"), key=lambda m: m.get("date", ""))


def merged_meta(metas: list[dict], key: str) -> dict:
    """``meta[key]`` of every sweep invocation, merged in date order (a later one wins)."""
    merged: dict = {}
    for m in sweep_metas(metas):
        merged.update(m.get(key) or {})
    return merged
