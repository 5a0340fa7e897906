"""The corpus of the study, built reproducibly on the machine where the study runs.

The GPU machines reach no registry, so the corpus is what the installed Python already holds:
the files of a size's corpus (:data:`.definition.CORPORA`: by default every ``*.py``, ``*.h``,
``*.rst`` and ``*.txt`` file) under its standard library and its site-packages
(:func:`python_roots`) and under the corpus's added folders (say ``/usr/include``, where the
Python tree alone is too small), or, with ``--data``, a file or every regular file under a
folder. The files are read in the order of their sorted absolute paths and concatenated; a file
whose bytes equal an earlier file's is dropped (site-packages hold many copies of the same
licence or vendored module), and so are empty ones.

The stream is cut into equal chunks (at least :data:`MIN_CHUNKS`, at most :data:`CHUNK_BYTES`
each); every ``1 / val_fraction``-th chunk, starting in the middle of the first stride, is
held out for validation, so the validation split samples the whole corpus and no training window
crosses into it. The training split is the other chunks, concatenated.

A build writes ``train.bin``, ``val.bin`` and ``manifest.json`` into a folder of the cache
named by a fingerprint of the file list (paths, sizes, modification times) and the split, so a
second invocation on the same machine reuses it. The manifest records the byte count, the SHA-1
of the sorted file list and of the content; :func:`describe` is what every run record carries.

Nothing here imports torch: the plan checks the corpus without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import site
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .definition import SUFFIXES

VAL_FRACTION = 0.01
CHUNK_BYTES = 2**16  # small, so that the validation chunks sample many packages
MIN_CHUNKS = 200
FORMAT = 1  # bump when the build changes what a cache folder holds
_SKIP_DIRS = frozenset({"__pycache__"})


class CorpusTooSmall(ValueError):
    """The corpus cannot feed a planned run in the passes its size allows."""


def python_roots() -> list[Path]:
    """The running interpreter's standard library and site-packages folders, outermost only."""
    paths = sysconfig.get_paths()
    candidates = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    candidates += site.getsitepackages()
    roots = sorted({Path(os.path.realpath(p)) for p in candidates if os.path.isdir(p)})
    return [r for r in roots if not any(r != other and r.is_relative_to(other) for other in roots)]


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found += [Path(dirpath, name) for name in filenames if suffixes is None or name.endswith(suffixes)]
    return found


def list_files(data: str | Path | None = None, extra_roots: list[str] | tuple = (),
               suffixes: tuple[str, ...] = SUFFIXES) -> tuple[str, list[Path]]:
    """(a description of the source, its files in sorted order of their resolved paths).

    ``data`` None: the files ending in one of ``suffixes`` (default :data:`SUFFIXES`) of the
    Python tree and of ``extra_roots``. A file: that file. A folder: every regular file below
    it, whatever its name.
    """
    if data is None:
        missing = [r for r in extra_roots if not os.path.isdir(r)]
        if missing:
            raise FileNotFoundError(f"the corpus's added folder(s) {missing} are missing on this machine")
        roots = python_roots() + [Path(os.path.realpath(r)) for r in extra_roots]
        source = (f"every {', '.join('*' + s for s in suffixes)} file under the installed Python's standard "
                  f"library and site-packages" + (" and the added folders" if extra_roots else "")
                  + f" ({', '.join(str(r) for r in roots)})")
    else:
        path = Path(data)
        if path.is_file():
            return str(path), [Path(os.path.realpath(path))]
        if not path.is_dir():
            raise FileNotFoundError(f"--data: no such file or folder: {path}")
        roots, suffixes, source = [path], None, f"every file under {path}"
    files = {Path(os.path.realpath(f)) for root in roots for f in _walk(root, suffixes)}
    return source, sorted((f for f in files if f.is_file()), key=str)


def fingerprint(files: list[Path]) -> str:
    """SHA-1 of every file's path, size and modification time: a cheap test that a cached build
    is still the corpus these files make."""
    digest = hashlib.sha1()
    for f in files:
        st = f.stat()
        digest.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def scan_bytes(files: list[Path]) -> int:
    """Bytes of the files, duplicates included: an upper bound of the corpus, without reading it."""
    return sum(f.stat().st_size for f in files)


def split_chunks(total: int, val_fraction: float) -> tuple[int, list[int]]:
    """(chunk size, indices of the validation chunks) of a stream of ``total`` bytes."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    count = max(MIN_CHUNKS, math.ceil(total / CHUNK_BYTES))
    chunk = max(1, math.ceil(total / count))
    count = math.ceil(total / chunk)
    stride = max(2, round(1 / val_fraction))
    return chunk, [i for i in range(count) if i % stride == stride // 2]


@dataclass(frozen=True)
class Corpus:
    """A built corpus: its folder (``train.bin``, ``val.bin``) and its manifest."""

    folder: Path
    manifest: dict

    @property
    def train_path(self) -> Path:
        return self.folder / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.folder / "val.bin"

    @property
    def train_bytes(self) -> int:
        return self.manifest["train_bytes"]


def build(data: str | Path | None, cache_dir: Path, *, extra_roots: list[str] | tuple = (),
          suffixes: tuple[str, ...] = SUFFIXES, val_fraction: float = VAL_FRACTION, log=print) -> Corpus:
    """The corpus of ``data``, ``extra_roots`` and ``suffixes`` (see :func:`list_files`) in
    ``cache_dir``, built unless a build of the same files and split is there already."""
    source, files = list_files(data, extra_roots, suffixes)
    if not files:
        raise CorpusTooSmall(f"no files for the corpus: {source}")
    key = hashlib.sha1(json.dumps([FORMAT, fingerprint(files), val_fraction]).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"corpus-{key}"
    if (folder / "manifest.json").is_file():
        return Corpus(folder, json.loads((folder / "manifest.json").read_text()))

    stream, used, seen = bytearray(), [], set()
    duplicates = empty = unreadable = 0
    for f in files:
        try:
            blob = f.read_bytes()
        except OSError:
            unreadable += 1
            continue
        if not blob:
            empty += 1
            continue
        digest = hashlib.sha1(blob).digest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        used.append(f)
        stream += blob
    if len(stream) < MIN_CHUNKS:
        raise CorpusTooSmall(f"{source} holds only {len(stream)} bytes")

    chunk, val_chunks = split_chunks(len(stream), val_fraction)
    view = memoryview(stream)
    held_out = set(val_chunks)
    count = math.ceil(len(stream) / chunk)
    val = b"".join(view[i * chunk:(i + 1) * chunk] for i in val_chunks)
    manifest = {
        "source": source, "suffixes": list(suffixes) if data is None else None,
        "roots": [str(r) for r in python_roots()] + list(extra_roots) if data is None else [str(data)],
        "files": len(used), "duplicates_dropped": duplicates, "empty_skipped": empty, "unreadable": unreadable,
        "bytes": len(stream),
        "file_list_sha1": hashlib.sha1("\n".join(str(f) for f in used).encode()).hexdigest(),
        "content_sha1": hashlib.sha1(stream).hexdigest(),
        "val_fraction": val_fraction, "chunk_bytes": chunk, "chunks": count, "val_chunks": len(val_chunks),
        "train_bytes": len(stream) - len(val), "val_bytes": len(val), "val_sha1": hashlib.sha1(val).hexdigest(),
        "fingerprint": key,
    }
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "train.bin", "wb") as out:
        for i in range(count):
            if i not in held_out:
                out.write(view[i * chunk:(i + 1) * chunk])
    (tmp / "val.bin").write_bytes(val)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"corpus: built {folder} from {len(used):,} files ({len(stream):,} bytes; {duplicates:,} duplicate files "
        f"dropped)")
    return Corpus(folder, manifest)


def windows(train_bytes: int, seq_len: int) -> int:
    """Training windows of ``seq_len`` inputs (and one more byte of targets) at stride ``seq_len``:
    each byte is an input of exactly one window."""
    return max(0, (train_bytes - 1) // seq_len)


def passes(train_bytes: int, size) -> float:
    """How often a run of ``size`` reads the training windows of a corpus of ``train_bytes``
    (at most 1: no byte seen twice)."""
    have = windows(train_bytes, size.seq_len)
    return size.steps * size.batch_size / have if have else math.inf


def check_fits(train_bytes: int, sizes, what: str = "the corpus") -> None:
    """Raise :class:`CorpusTooSmall` unless every size's run fits in the passes it allows
    (``max_passes``: 1 reads only unseen bytes)."""
    for size in sorted(sizes, key=lambda s: -s.tokens):
        if passes(train_bytes, size) > size.max_passes:
            needed = math.ceil(size.steps * size.batch_size / size.max_passes) * size.seq_len + 1
            limit = "to see no byte twice" if size.max_passes == 1 else f"in at most {size.max_passes} passes"
            raise CorpusTooSmall(
                f"{what} has {train_bytes:,} training bytes ({windows(train_bytes, size.seq_len):,} windows of "
                f"{size.seq_len}); a run of size {size.name} reads {size.steps:,} steps x {size.batch_size} x "
                f"{size.seq_len} = {size.tokens:,} tokens, so it needs {needed:,} training bytes {limit}: "
                f"{needed - train_bytes:,} more. Use a larger corpus (--data) or leave that size's tier out (--tiers).")


def describe(manifest: dict) -> dict:
    """The corpus as every run record carries it."""
    keys = ("source", "files", "duplicates_dropped", "bytes", "file_list_sha1", "content_sha1",
            "val_fraction", "chunk_bytes", "val_chunks", "train_bytes", "val_bytes", "val_sha1")
    return {key: manifest[key] for key in keys}
