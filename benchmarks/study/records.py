"""The records of the study: the JSON that the runner writes and the report reads.

Every file holds one JSON object whose ``"kind"`` says what it is:

``"bundle"`` (``--bundle``): everything one invocation wrote, rewritten after every record::

    {"kind": "bundle", "meta": META, "runs": [RUN, ...], "throughput": [THROUGHPUT, ...],
     "skipped": [{"id": RUN_ID, "reason": "..."}, ...]}

``"meta"`` (``--out``, beside the per-run files): ``{"kind": "meta", "meta": META}``.

``"run"``: one training run, also one file per run under ``--out``. ``id`` is :func:`run_id`;
``size``, ``optimizer``, ``lr``, ``seed``, ``stage`` ("sweep", "best_lr" or "transfer"), the budget
(``steps``, ``batch_size``, ``seq_len``, ``tokens``, ``eval_every``, ``eval_batches``, ``model``,
``dtype``), ``optimizer_description``, ``magma_fused``, ``status`` ("ok", "diverged" or
"error"), ``error``, ``wall_s``; a finished run adds ``final_train_loss``, ``final_val_loss``,
``final_val_ppl``, ``ms_per_step``, ``tokens_per_s``, ``peak_mem_bytes``, ``num_parameters`` and
the curves ``train_loss`` / ``val_loss`` (``[step, loss]`` pairs, :func:`curve`); then
``command``, ``date``, ``env`` and ``data`` of its invocation. Edition 2 adds ``edition``,
``tier``, ``lr_rule`` (how a best-lr or transfer run chose its lr: "best", "S-best", "S-best+1"),
``lr_note``, ``compile``, ``side_by_side``, ``gpu``, ``train_time_s``, ``eval_time_s``,
``warmup_s``, ``timed_steps`` and ``resumed_at`` (steps at which it went on from a checkpoint);
its ``data`` describes the corpus (:func:`.corpus.describe`): file list and content SHA-1.

``"throughput"``: one optimizer's step timing of ``--mode throughput`` (size, optimizer,
tokens_per_s, step_ms, step_ms_windows, opt_step_ms_median, opt_step_ms_min, state_bytes,
peak_mem_bytes, ``measurement``: the invocation's META date, shared by the rows timed side by side, ...).

META: ``command``, ``date`` (:func:`now_utc`), ``mode`` ("sweep" or "throughput"), ``edition``
(absent in edition 1's records), ``quick``,
``env``, ``data``; a sweep adds ``shard``, ``num_shards``, ``time_budget_s``, ``sizes``,
``optimizers`` (name -> lrs, description), ``weight_decay``, ``betas``,
``muon_adamw_lr_ratio``, ``planned_runs`` and ``resumed_from``; edition 2 adds ``tiers``,
``parallel``, ``gpus``, ``compile`` and, when the invocation ends, ``aggregate`` (tokens trained,
wall seconds, tokens/s per GPU).

Several invocations make one study: :func:`load_study` merges any mix of bundles, per-run files
and folders of them, one record per run id, and :func:`merged_meta` merges their set-ups. Edition
2's runs of a size count only on one corpus (:func:`study_corpora`): the corpus is built from the machine's
installed files, so another machine image trains and validates on other bytes.
Nothing here imports torch.
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


def throughput_filename(size: str, optimizer: str) -> str:
    return f"throughput__{size}__{optimizer}.json"


def meta_filename(meta: dict) -> str:
    shard = f"shard{meta['shard']}of{meta['num_shards']}" if meta["mode"] == "sweep" else meta["mode"]
    return f"meta__{shard}.json"


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


class RecordWriter:
    """Writes each record to ``out_dir`` (if any) and rewrites the one ``bundle`` file after
    every record, so a run killed midway still leaves everything finished so far."""

    def __init__(self, out_dir: Path | None, bundle: Path | None, meta: dict):
        self.out_dir, self.bundle = out_dir, bundle
        self.contents = {"kind": "bundle", "meta": meta, **{section: [] for section in SECTIONS}}
        for path in (out_dir, bundle.parent if bundle else None):
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)
        if out_dir is not None:  # the set-up the report describes, beside the per-run files
            write_json(out_dir / meta_filename(meta), {"kind": "meta", "meta": meta})
        self.flush()

    def add(self, section: str, record: dict, filename: str | None = None) -> None:
        self.contents[section].append(record)
        if self.out_dir is not None and filename:
            write_json(self.out_dir / filename, record)
        self.flush()

    def set_meta(self, key: str, value) -> None:
        """Add ``key`` to the bundle's meta (what is known only at the end, say)."""
        self.contents["meta"][key] = value
        self.flush()

    def flush(self) -> None:
        if self.bundle is not None:
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
    """The content SHA-1 of the corpus an edition-2 run or invocation trained on (``data``);
    None for a record that names none (edition 1's capped stream)."""
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


def edition_of(metas: list[dict], runs: list[dict]) -> int:
    """The study edition that the records belong to (edition 1's records name none); records
    of two editions do not make one study."""
    found = {m.get("edition", 1) for m in metas} | {r.get("edition", 1) for r in runs}
    if len(found) > 1:
        raise ValueError(f"the inputs hold records of editions {sorted(found)}: report each edition on its own")
    return found.pop() if found else 1


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

    def admits(self, corpus: str | None) -> bool:
        """Whether an invocation that trained on ``corpus`` belongs to the study (its set-up, its skips)."""
        return corpus is None or not self.corpora or corpus in self.corpora.values()


def json_files(paths: list[str]) -> list[Path]:
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


def load_study(paths: list[str]) -> Study:
    """Bundles, single records and folders of them (searched recursively) as one study. A run
    found twice (in a folder and in a bundle) counts once, a finished copy over a failed one;
    a skipped run that another input finished is no longer skipped (a best-lr or transfer run
    by its rule's id too), and one that several invocations skipped counts once, with the
    reason of the newest (by its bundle's date, whatever the order of the inputs). Only runs on
    their size's corpus (:func:`study_corpora`) count; the others are kept aside in
    ``other_corpus_runs``, and so are the set-ups of invocations that trained on another corpus."""
    run_records, skipped, throughput, study = [], [], {}, Study()
    for path in json_files(paths):
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind == "bundle":
            meta = obj.get("meta", {})
            study.metas.append(meta)
            skipped += [(meta.get("date") or "", corpus_of(meta), entry) for entry in obj.get("skipped", [])]
            records = obj.get("runs", []) + obj.get("throughput", [])
        elif kind == "meta":
            study.metas.append(obj["meta"])
            records = []
        elif kind in ("run", "throughput"):
            records = [obj]
        else:
            continue  # not a record of this study
        for r in records:
            if r["kind"] == "run":
                run_records.append(r)
            else:
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
