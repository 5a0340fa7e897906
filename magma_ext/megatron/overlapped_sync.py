"""The sparse parameter sync under Megatron's ``overlap_param_gather``: one bucket group at a time.

With ``overlap_param_gather`` Megatron does not gather after the optimizer step. Each bucket
group's gather is launched from the forward pre-hooks of the next iteration (the first one when
a module first uses one of its parameters, the next group's while the current one is waited
for), through the bucket group's ``start_param_sync(force_sync=False)``, which leaves a handle in
``param_gather_handle``; ``finish_param_sync`` waits on it. ``start_param_sync(force_sync=True)``
(``disable_forward_pre_hook``, before evaluation or a checkpoint) completes a gather in flight,
or runs one to the end.

:class:`BucketGroupSync` takes the place of one bucket group's ``start_param_sync`` and keeps
that contract, with the sparse gather of its buckets (a part of a
:class:`~magma_ext.megatron.sparse_gather.SparseGather`) as the handle. It moves only what
changed when exactly one optimizer step ran since the group's last gather; in every other case
(no step since: the first forward, a step skipped for overflow, a repeated forced sync; more than
one step; no masked parameter group) it runs Megatron's own dense gather, which is right in all
of them.

No megatron-core import: it reads and sets the bucket group's ``param_gather_handle``,
``param_gather_dispatched`` and ``ddp_config.overlap_param_gather`` and calls its
``_post_param_sync`` (megatron-core 0.19), so CPU tests drive it with a stand-in.
"""

from __future__ import annotations

from typing import Callable

from .sparse_gather import SparseGather
from .sync_bytes import SyncBytes

__all__ = ["BucketGroupSync"]


class BucketGroupSync:
    """One Megatron bucket group's ``start_param_sync``, sparse where it can be.

    Args:
        bucket_group: the bucket group (its ``start_param_sync`` is replaced by :meth:`install`).
        gather: the sparse gather holding its buckets as part ``part``.
        rules: returns the mask rules of the step just taken (``{group position: MaskRule}``).
        steps_taken: returns the optimizer steps taken so far (host count).
    """

    def __init__(self, bucket_group, gather: SparseGather, part: int, rules: Callable[[], dict],
                 steps_taken: Callable[[], int]):
        self.bucket_group = bucket_group
        self.gather = gather
        self.part = part
        self.rules = rules
        self.steps_taken = steps_taken
        self.dense_start = bucket_group.start_param_sync  # Megatron's own
        self.synced_step: int | None = None  # steps taken when the last gather started (None: never)
        self.last = SyncBytes()  # what the last gather moved

    def install(self) -> None:
        self.bucket_group.start_param_sync = self.start_param_sync

    def start_param_sync(self, force_sync: bool = False) -> None:
        """Megatron's ``start_param_sync`` contract: with ``force_sync``, complete a gather in
        flight or run one to the end; else launch one (asynchronous under
        ``overlap_param_gather``) and leave its handle in ``param_gather_handle``."""
        group = self.bucket_group
        if force_sync and group.param_gather_handle is not None:
            self.dense_start(force_sync=True)  # waits for the handle (ours or Megatron's) and post-processes
            return
        step, rules = self.steps_taken(), self.rules()
        sparse = (self.synced_step is not None and step == self.synced_step + 1
                  and any(rule.masked for rule in rules.values()))
        self.synced_step = step
        if not sparse:
            self.dense_start(force_sync=force_sync)
            self.last = self.gather.dense_bytes(self.part).moved_densely()
            return
        assert group.param_gather_handle is None, "a parameter gather of this bucket group is still in flight"
        pending = self.gather.start(rules, step, self.part)
        self.last = pending.moved
        overlapped = group.ddp_config.overlap_param_gather and not force_sync
        if overlapped:
            group.param_gather_handle = pending
        else:
            pending.wait()
            if group.ddp_config.overlap_param_gather:
                group._post_param_sync()
        group.param_gather_dispatched = True
