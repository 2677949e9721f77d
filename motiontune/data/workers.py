"""Run per-file work (probing, decoding) in worker processes, so a decoder that crashes on one file
costs that file, not the run."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


class WorkerCrash(Exception):
    """The worker process died on this job (a decoder crash, or out of memory)."""


def map_isolated(function: Callable, jobs: Iterable, workers: int) -> Iterator[tuple[object, object]]:
    """Yield (job, result) in job order; result is the function's value or the exception it raised
    (a `WorkerCrash` when the process died). `workers` = 0 runs everything in this process."""
    jobs = list(jobs)
    if workers <= 0 or len(jobs) <= 1:
        for job in jobs:
            yield job, _call(function, job)
        return
    context = multiprocessing.get_context("spawn")  # no inherited CUDA or thread state in the workers
    start = 0
    while start < len(jobs):
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs) - start), mp_context=context) as pool:
            futures = [pool.submit(_call, function, job) for job in jobs[start:]]
            first = start
            for future in futures:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    break
                yield jobs[start], result
                start += 1
            else:
                return
        # A worker died and took the pool's queue with it. The pool hands jobs out in order, so the one that
        # crashed is among the next 2 x workers + 1 (running, or waiting in its queue): run those one per
        # process, so the crash is pinned on the file that caused it, then go on with a new pool.
        suspects = futures[start - first : start - first + 2 * workers + 1]
        for job, future in zip(jobs[start : start + len(suspects)], suspects):
            finished = future.done() and not isinstance(future.exception(), BrokenProcessPool)
            yield job, future.result() if finished else _run_alone(function, job, context)
            start += 1


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
