"""run_graph: the demo's and the study's trainings as one task graph (a task starts when what it
needs has finished; independent tasks share the workers)."""
import os
import time
from pathlib import Path

import pytest

from m2skd.pipeline.parallel import Task, run_graph


def _meet(arg):
    """Writes its mark, then waits for the other's: finishes only if both run at once."""
    folder, me, other = arg
    (Path(folder) / me).touch()
    deadline = time.monotonic() + 60
    while not (Path(folder) / other).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never ran beside {me}")
        time.sleep(0.01)
    return me


def _log(arg):
    """Appends its name to a log and returns the names logged before it (what had finished)."""
    log, name = arg
    before = Path(log).read_text().split() if Path(log).exists() else []
    with open(log, "a") as f:
        f.write(name + "\n")
    return before


def _fail(arg):
    raise RuntimeError(f"task {arg} failed")


def test_independent_tasks_run_side_by_side_and_needs_are_finished_first(tmp_path):
    log = str(tmp_path / "log")
    tasks = {
        # the teacher and a baseline must be under way together (each waits for the other's mark)
        "teacher": Task(_meet, (str(tmp_path), "teacher", "baseline")),
        "baseline": Task(_meet, (str(tmp_path), "baseline", "teacher")),
        "distilled": Task(_log, (log, "distilled"), needs=("teacher",)),
        "eval distilled": Task(_log, (log, "eval"), needs=("distilled", "baseline")),
    }
    done = []
    results = run_graph(tasks, jobs=2, on_done=lambda key, result: done.append(key))
    assert results["teacher"] == "teacher" and results["baseline"] == "baseline"
    assert results["distilled"] == [] and results["eval distilled"] == ["distilled"]
    assert sorted(done) == sorted(tasks) and done.index("distilled") > done.index("teacher")


def test_one_job_runs_in_order_of_needs_in_this_process(tmp_path):
    log = str(tmp_path / "log")
    tasks = {"b": Task(_log, (log, "b"), needs=("a",)), "a": Task(_log, (log, "a")), "c": Task(_log, (log, "c"))}
    results = run_graph(tasks, jobs=1)
    assert Path(log).read_text().split() == ["a", "b", "c"]
    assert results["b"] == ["a"] and results["c"] == ["a", "b"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_task_starts_nothing_that_needs_it(tmp_path, jobs):
    log = str(tmp_path / "log")
    tasks = {"teacher": Task(_fail, "teacher"), "distilled": Task(_log, (log, "distilled"), needs=("teacher",))}
    with pytest.raises(RuntimeError, match="task teacher failed"):
        run_graph(tasks, jobs=jobs)
    assert not os.path.exists(log)


@pytest.mark.parametrize("jobs", [1, 2])
def test_needs_that_cannot_be_met_are_refused(tmp_path, jobs):
    log = str(tmp_path / "log")
    with pytest.raises(ValueError, match="not in the graph: teacher"):
        run_graph({"distilled": Task(_log, (log, "d"), needs=("teacher",))}, jobs=jobs)
    with pytest.raises(ValueError, match="need each other"):
        run_graph({"a": Task(_log, (log, "a"), needs=("b",)), "b": Task(_log, (log, "b"), needs=("a",))}, jobs=jobs)
    assert not os.path.exists(log)
