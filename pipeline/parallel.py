"""joblib execution shared by prepare and cache-teacher: loky locally, Dask beyond one machine."""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable

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
    with backend(dask_scheduler), warnings.catch_warnings():
        # loky replaces a worker whose memory grew 300 MB past its first task (a torch training's
        # allocator caches do) and warns of a leak; the task's result is unaffected
        warnings.filterwarnings("ignore", message="A worker stopped while some jobs were given to the executor")
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
