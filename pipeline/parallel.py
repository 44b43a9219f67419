"""joblib execution shared by prepare and cache-teacher: loky locally, Dask beyond one machine;
and a small task graph for the demo's and the study's trainings."""
from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable

import torch
from joblib import Parallel, delayed, parallel_config

from m2skd.errors import M2SKDError


@contextlib.contextmanager
def backend(dask_scheduler: str | None):
    """With a scheduler address, run joblib tasks on that Dask cluster (`pip install m2skd[dask]`)."""
    if not dask_scheduler:
        yield
        return
    try:
        from distributed import Client  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise M2SKDError("--dask-scheduler needs dask[distributed]: pip install 'm2skd[dask]'") from None
    try:
        client = Client(dask_scheduler)
    except (ValueError, OSError, TimeoutError) as exc:
        raise M2SKDError(f"--dask-scheduler {dask_scheduler}: no Dask scheduler reached ({str(exc).splitlines()[0]})") from None
    with client, parallel_config(backend="dask"):
        yield


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for one task and restored after: a task run in this
    process (jobs=1) must not change the thread count, hence the bits, of what runs next in it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_tasks(fn: Callable, tasks: Iterable, jobs: int, on_done: Callable | None = None, dask_scheduler: str | None = None) -> list:
    """fn(task) for each task, results in completion order; on_done(task, result) as each ends."""
    tasks = list(tasks)
    results = []
    with backend(dask_scheduler), _quiet_worker_restarts():
        if jobs == 1 and not dask_scheduler:
            stream = ((t, fn(t)) for t in tasks)
        else:
            par = Parallel(n_jobs=jobs, return_as="generator_unordered")
            stream = par(delayed(lambda t: (t, fn(t)))(t) for t in tasks)
        for task, result in stream:
            results.append(result)
            if on_done:
                on_done(task, result)
    return results


@dataclass(frozen=True)
class Task:
    """fn(arg), started once every task named in `needs` has finished."""
    fn: Callable
    arg: object
    needs: tuple = field(default_factory=tuple)


@contextlib.contextmanager
def _quiet_worker_restarts():
    with warnings.catch_warnings():
        # loky replaces a worker whose memory grew 300 MB past its first task (a torch training's
        # allocator caches do) and warns of a leak; the task's result is unaffected
        warnings.filterwarnings("ignore", message="A worker stopped while some jobs were given to the executor")
        yield


def run_graph(tasks: dict[Hashable, Task], jobs: int, on_done: Callable | None = None) -> dict:
    """key -> result of each task, up to `jobs` in worker processes at a time, a ready task
    started in the order `tasks` gives: a study's baselines train beside its teachers and a
    distilled student starts as soon as its own teacher's cache exists, with no core left idle
    waiting for a stage to end. on_done(key, result) as each ends. When a task fails, none
    is started after it; its error is raised once those under way have ended."""
    unknown = sorted({str(n) for t in tasks.values() for n in t.needs if n not in tasks})
    if unknown:
        raise ValueError(f"tasks need tasks that are not in the graph: {', '.join(unknown)}")
    pending, results = dict(tasks), {}

    def ready():
        return [k for k, t in pending.items() if all(n in results for n in t.needs)]

    def finish(key, result):
        results[key] = result
        if on_done:
            on_done(key, result)

    if jobs == 1:
        while pending:
            if not ready():
                raise ValueError(f"tasks that need each other: {', '.join(map(str, pending))}")
            key = ready()[0]
            task = pending.pop(key)
            finish(key, task.fn(task.arg))
        return results
    # loky's executor (joblib's engine) but a pool of the graph's own: joblib's shared one is set up for its memmapping
    from joblib.externals.loky import ProcessPoolExecutor  # noqa: PLC0415 - only where workers are used

    running, error = {}, None
    with _quiet_worker_restarts(), ProcessPoolExecutor(max_workers=jobs) as executor:
        while pending or running:
            if error is None:
                for key in ready()[:jobs - len(running)]:
                    task = pending.pop(key)
                    running[executor.submit(task.fn, task.arg)] = key
            if not running:
                if error is None:
                    raise ValueError(f"tasks that need each other: {', '.join(map(str, pending))}")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                if future.exception() is not None:
                    error = error or future.exception()
                else:
                    finish(key, future.result())
    if error is not None:
        raise error
    return results
