"""Run a function on N local ranks (gloo on CPU) and bring each rank's result back to the test.

    from distributed_helpers import run_ranks

    def _body(rank, n):                # module level: spawned processes import it by name
        ...                            # torch.distributed is initialized (gloo, world size N)
        return something_picklable

    def test_x():
        results = run_ranks(2, _body, 3)   # [result of rank 0, result of rank 1]

* Each rank runs ``fn(rank, *args)`` in a fresh process (``spawn``: safe with threads and CUDA
  in the parent) after ``init_process_group("gloo")``; what it returns comes back, pickled, in
  rank order. The process group is destroyed afterwards.
* The rendezvous is a ``TCPStore`` that the parent opens on 127.0.0.1 with port 0, so the OS
  picks a free port and two concurrent runs cannot race for one.
* If a rank raises, the other ranks get a few seconds to finish (they may be waiting for it in
  a collective), then every process still alive is killed and the exception of the rank that
  failed first (the others' errors are often consequences: "connection closed by peer") is
  raised in the parent: the original exception when it unpickles, with the
  rank's traceback text attached as a note and as the ``__cause__`` (a :class:`RankError`),
  else a :class:`RankError` carrying that text.
* A run that takes longer than ``timeout`` seconds (a hang, say a collective one rank never
  joined) kills every process and raises :class:`RankTimeout`, naming the ranks that did not
  finish, instead of hanging the test session.
* Each process uses one intra-op thread (``torch.set_num_threads(1)``): CI machines have few
  cores. Start-up (importing torch) dominates the cost, so run many cases in one call.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import sys
import time
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 120.0  # seconds for the whole run, start-up included
ERROR_GRACE = 10.0  # seconds the other ranks get to finish once one rank has failed
# NVLink multicast off in every NCCL rank, as the GPU machines' documentation asks
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class RankError(RuntimeError):
    """A rank raised; ``rank`` is its rank and ``remote_traceback`` its traceback text."""

    def __init__(self, rank: int, remote_traceback: str):
        super().__init__(f"rank {rank} raised:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


class RankTimeout(TimeoutError):
    """The ranks did not all finish in time (a hang); ``pending`` lists the ranks that did not."""

    def __init__(self, pending: list[int], timeout: float):
        super().__init__(f"ranks {pending} did not finish within {timeout:g} s (hung?); killed")
        self.pending = pending


def run_ranks(world_size: int, fn, *args, timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo",
              env: dict[str, str] | None = None, error_grace: float = ERROR_GRACE) -> list:
    """Run ``fn(rank, *args)`` on ``world_size`` processes in one process group; return the results.

    ``fn`` and ``args`` must be picklable (a module-level function, plain data). ``env`` adds
    environment variables to every rank (set before torch.distributed is initialized).
    ``timeout`` bounds the whole run; once a rank has failed, the others get ``error_grace``
    more seconds. ``backend="nccl"`` works as well on a machine with ``world_size`` GPUs (each
    rank then calls ``torch.cuda.set_device(rank)`` itself).
    """
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_rank_main, daemon=True,
                        args=(rank, world_size, store.port, backend, timeout, dict(env or {}),
                              results, pickle.dumps((fn, args))))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    done: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            failed = any(not ok for ok, _ in done.values())
            now = time.monotonic()
            if failed:
                deadline = min(deadline, now + error_grace)
            if now >= deadline:
                break
            try:
                rank, ok, payload = results.get(timeout=min(1.0, deadline - now))
            except queue_module.Empty:
                if not failed and _dead_without_report(processes, done, results):
                    break
                continue
            done[rank] = (ok, payload)
    finally:
        exit_codes = [process.exitcode for process in processes]  # before any kill: None = still running
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=5)
        results.close()
        del store
    failures = [rank for rank, (ok, _) in done.items() if not ok]  # in order of arrival
    if failures:
        silent = [f"rank {rank}: " + ("still running" if code is None else f"exit code {code}")
                  for rank, code in enumerate(exit_codes) if rank not in done]
        _raise_remote(failures[0], done[failures[0]][1], silent)
    pending = [rank for rank in range(world_size) if rank not in done]
    if pending:
        dead = [rank for rank in pending if processes[rank].exitcode not in (None, -9)]
        if dead:
            raise RankError(dead[0], f"process exited with code {processes[dead[0]].exitcode} "
                                     "without reporting a result")
        raise RankTimeout(pending, timeout)
    return [pickle.loads(done[rank][1]) for rank in range(world_size)]


def _dead_without_report(processes, done, results) -> bool:
    """True when a rank's process has exited without putting its result (a crash)."""
    for rank, process in enumerate(processes):
        if rank not in done and not process.is_alive() and process.exitcode != 0:
            return results.empty()
    return False


def _raise_remote(rank: int, payload, silent: list[str]) -> None:
    """Raise rank ``rank``'s exception; ``silent``: how the ranks that reported nothing ended
    (a peer's crash shows on the others as a broken connection)."""
    pickled_exception, text = payload
    if silent:
        text += "\nranks that reported nothing: " + "; ".join(silent)
    cause = RankError(rank, text)
    try:
        exception = pickle.loads(pickled_exception) if pickled_exception is not None else None
    except Exception:  # an exception type that does not unpickle: report the text only
        exception = None
    if not isinstance(exception, BaseException):
        raise cause
    exception.add_note(f"(raised on rank {rank}; its traceback:)\n{text}")
    raise exception from cause


def _rank_main(rank, world_size, port, backend, timeout, env, results, pickled_call) -> None:
    os.environ.update(env)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no host-name lookup in sandboxes
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, None, False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            fn, args = pickle.loads(pickled_call)
            value = fn(rank, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
        text = traceback.format_exc()
        try:
            pickled = pickle.dumps(error)
            pickle.loads(pickled)
        except Exception:
            pickled = None
        results.put((rank, False, (pickled, text)))


def run_nccl_ranks(fn, *args, timeout: float = 300.0) -> list:
    """:func:`run_ranks` on 2 GPUs over NCCL, with :data:`NCCL_ENV` under the caller's environment."""
    return run_ranks(2, fn, *args, backend="nccl", env={**NCCL_ENV, **os.environ}, timeout=timeout)
