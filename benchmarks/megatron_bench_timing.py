"""CUDA-event timings of benchmarks/megatron_bench.py: no host synchronisation until they are read."""

from __future__ import annotations

import statistics

import torch


class EventTimer:
    """CUDA events around calls, grouped by iteration; read once, after the last iteration."""

    def __init__(self):
        self.iterations: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = []

    def next_iteration(self) -> None:
        self.iterations.append([])

    def start(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start: torch.cuda.Event) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.iterations[-1].append((start, end))

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(start)
        return timed

    def milliseconds(self) -> list[float | None]:
        """Per iteration, the summed time of its calls (None where nothing was called)."""
        torch.cuda.synchronize()
        return [sum(s.elapsed_time(e) for s, e in calls) if calls else None for calls in self.iterations]


def time_inner_steps(optimizer, timer: EventTimer) -> None:
    """Put CUDA events around each inner optimizer's step() (Megatron calls it with no arguments)."""
    for part in optimizer.chained_optimizers:
        inner = getattr(part, "optimizer", None)
        if inner is not None:
            inner.step = timer.wrap(inner.step)


def time_param_syncs(optimizer, timer: EventTimer) -> None:
    """Put CUDA events around each distributed-optimizer part's parameter all-gather: Megatron's
    step_with_ready_grads launches it through the part's start_param_sync_for_bucket_group_subset()
    (wrapped on the instance, so the call finds the timed one; other wrappers have no such method)."""
    for part in optimizer.chained_optimizers:
        launch = getattr(part, "start_param_sync_for_bucket_group_subset", None)
        if launch is not None:
            part.start_param_sync_for_bucket_group_subset = timer.wrap(launch)


def median_after_warmup(values: list[float | None], warmup: int) -> float | None:
    """The median of the values after the first ``warmup`` (iterations with no call left out),
    None if nothing is left."""
    kept = [v for v in values[warmup:] if v is not None]
    return statistics.median(kept) if kept else None

