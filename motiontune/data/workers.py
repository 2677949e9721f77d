"""Run per-file work (probing, decoding) in worker processes, so a decoder that crashes on one file
costs that file, not the run."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


class WorkerCrash(Exception):
    """The worker process died on this job (a decoder crash, or out of memory)."""


def map_isolated(function: Callable, jobs: Iterable, workers: int) -> Iterator[tuple[object, object]]:
    """Yield (job, result) in job order; result is the function's value or the exception it raised
    (a `WorkerCrash` when the process died). `workers` = 0 runs everything in this process. At most
    2 x workers jobs are in flight, so results (decoded frames) wait in memory only for a slow consumer's
    next few, however many jobs there are."""
    jobs = list(jobs)
    if workers <= 0 or len(jobs) <= 1:
        for job in jobs:
            yield job, _call(function, job)
        return
    context = multiprocessing.get_context("spawn")  # no inherited CUDA or thread state in the workers
    ahead, done = 2 * workers, 0
    while done < len(jobs):
        window: deque = deque()  # futures of jobs[done:done + len(window)]
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs) - done), mp_context=context) as pool:
            try:
                while done < len(jobs):
                    while len(window) < ahead and done + len(window) < len(jobs):
                        window.append(pool.submit(_call, function, jobs[done + len(window)]))
                    result = window[0].result()
                    window.popleft()
                    yield jobs[done], result
                    done += 1
                return
            except BrokenProcessPool:
                pass
        # A worker died and took the pool with it; the job that crashed is one of those in flight. Each of them
        # that did not finish runs in a process of its own, so the crash is pinned on its file; then a new pool.
        for future in window:
            finished = future.done() and not isinstance(future.exception(), BrokenProcessPool)
            yield jobs[done], future.result() if finished else _run_alone(function, jobs[done], context)
            done += 1


def _run_alone(function, job, context):
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(_call, function, job).result()
        except BrokenProcessPool:
            return WorkerCrash(
                "the worker process died on this file (a decoder crash, or out of memory; if every file says this and "
                "you call motiontune from your own script, put the call under `if __name__ == \"__main__\":` or set "
                "dataloader_threads to 0)"
            )


def _call(function, job):
    try:
        return function(job)
    except Exception as error:  # returned, not raised: one file's problem is data, not a failure
        return error
