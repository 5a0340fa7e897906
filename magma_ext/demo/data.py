"""Byte-level text data for the demo: load a corpus, split it, cut it into batches.

The default corpus is the Python standard library of the running interpreter (every ``*.py``
file under ``sysconfig.get_paths()["stdlib"]``, site-packages excluded): real text that every
machine has without a download. Tokens are bytes, so the vocabulary is 256.

Determinism: files are ordered by the SHA-1 of their path relative to the corpus root (a
fixed shuffle, so a size cap still samples the whole library rather than its first few
packages), the stream is capped at ``max_bytes``, and the last ``val_fraction`` of it is the
validation split. The same Python version therefore gives the same split on every machine.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_VAL_FRACTION = 0.05
# Installed third-party packages live inside the stdlib folder; they are not the stdlib.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """The directory holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(path: str | Path | None = None) -> tuple[Path, list[Path]]:
    """The corpus root and its files in their fixed order.

    ``path=None``: the standard library's ``*.py`` files. A file: just that file. A folder:
    every regular file below it, whatever its extension.
    """
    if path is None:
        root, suffix, skip_dirs = stdlib_root(), ".py", _NOT_STDLIB
    else:
        root, suffix, skip_dirs = Path(path), "", frozenset()
        if root.is_file():
            return root.parent, [root]
        if not root.is_dir():
            raise FileNotFoundError(f"no such file or directory: {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        files += [Path(dirpath, name) for name in filenames if name.endswith(suffix)]
    files = [f for f in files if f.is_file()]

    def shuffle_key(f: Path) -> str:
        return hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest()

    return root, sorted(files, key=shuffle_key)


def load_corpus(path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Read up to ``max_bytes`` of the corpus and split it into (train, val) uint8 tensors."""
    if max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2, got {max_bytes}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root, files = corpus_files(path)
    chunks, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        blob = f.read_bytes()[: max_bytes - total]
        chunks.append(blob)
        total += len(blob)
    stream = b"".join(chunks)
    if len(stream) < 2:
        raise ValueError(f"corpus at {root} holds fewer than 2 bytes")
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val].clone(), data[-n_val:].clone()


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int,
             device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets for windows of ``seq_len`` starting at ``starts``."""
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx].long()
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def _check_fits(data: torch.Tensor, seq_len: int, what: str) -> None:
    if len(data) < seq_len + 1:
        raise ValueError(f"{what} split has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
                         "use more data or a shorter --seq-len")


def batches(data: torch.Tensor, batch_size: int, seq_len: int, *, seed: int = 0,
            device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random training windows ``(inputs, targets)``, each (batch_size, seq_len) int64.

    The window starts come from a CPU generator seeded with ``seed``, so two runs with the
    same seed see the same data in the same order on any device.
    """
    _check_fits(data, seq_len, "train")
    generator = torch.Generator().manual_seed(seed)
    high = len(data) - seq_len
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        yield _windows(data, starts, seq_len, device)


def eval_batches(data: torch.Tensor, batch_size: int, seq_len: int, max_batches: int, *,
                 device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: up to ``max_batches`` batches of windows spread evenly over
    ``data`` (non-overlapping where the split is long enough)."""
    _check_fits(data, seq_len, "validation")
    n_windows = max(1, min(max_batches * batch_size, (len(data) - 1) // seq_len))
    starts = torch.linspace(0, len(data) - seq_len - 1, n_windows).long()
    return [_windows(data, starts[i:i + batch_size], seq_len, device)
            for i in range(0, n_windows, batch_size)]
