"""The bench's CPU accounting by phase: each call is charged its own thread's CPU, so a phase run
by a helper thread (the shard writer's compression) is not also charged to the caller waiting
for it."""
import threading
import time
import types

from m2skd.pipeline.bench import cpu_by_phase


def _spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_work_of_a_helper_thread_is_charged_to_its_phase_only():
    work = types.SimpleNamespace()
    work.compress = lambda: _spin(0.2)

    def write():  # works while a thread compresses, then waits for it
        helper = threading.Thread(target=lambda: work.compress())
        helper.start()
        _spin(0.1)
        helper.join()

    work.write = write
    with cpu_by_phase({"compress": [(work, "compress")], "write": [(work, "write")]}) as spent:
        work.write()
    assert 0.19 < spent["compress"] < 0.28  # not also the caller's CPU while it ran
    assert 0.09 < spent["write"] < 0.15  # its own 0.1 s, none of the helper's
