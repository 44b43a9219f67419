"""Progress in logs: one line at most every 30 s, at least every 60 s while working, with
done/total, rate, elapsed and ETA; a bar on a terminal. A fake clock stands in for time."""
import io
import re

from click.testing import CliRunner

from m2skd import cli
from m2skd.pipeline.progress import Bar, LogLines, Progress, Silent, stop_all


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def lines_of(stream):
    return [line for line in stream.getvalue().splitlines() if line]


def test_lines_are_spaced_and_complete():
    clock, out = Clock(), io.StringIO()
    progress = LogLines("prepare", "scan", stream=out, clock=clock, heartbeat=False)
    progress(total=200)
    times = []
    for second in range(1, 201):
        clock.now += 1
        before = len(lines_of(out))
        progress(advance=1)
        if len(lines_of(out)) > before:
            times.append(second)
    assert times == [30, 60, 90, 120, 150, 180], times
    first = lines_of(out)[0]
    assert first == "[prepare] 30/200 scans (15%), 1 scans/s, elapsed 0:30, ETA 2:50", first
    progress.close()
    assert lines_of(out)[-1].startswith("[prepare] 200/200 scans (100%)") and lines_of(out)[-1].endswith("done")


def test_heartbeat_while_one_step_takes_minutes():
    """No update for 150 s (one long step): the heartbeat's polls still give a line every 30 s."""
    clock, out = Clock(), io.StringIO()
    progress = LogLines("train-teacher", "step", stream=out, clock=clock, heartbeat=False)
    progress(total=10, set_to=0, postfix={"loss": 1.23456})
    printed = []
    for second in range(1, 151):
        clock.now += 1
        before = len(lines_of(out))
        progress.poll()
        if len(lines_of(out)) > before:
            printed.append(second)
    assert printed == [30, 60, 90, 120, 150]
    assert all(gap <= 60 for gap in (b - a for a, b in zip([0] + printed, printed)))
    assert lines_of(out)[0] == "[train-teacher] 0/10 steps (0%), rate -, elapsed 0:30, ETA - | loss=1.23"


def test_slow_rate_resume_and_reset():
    clock, out = Clock(), io.StringIO()
    progress = LogLines("train-student", "step", stream=out, clock=clock, heartbeat=False)
    progress(total=100, set_to=40)  # resumed at step 40: the rate counts from there
    for _ in range(3):
        clock.now += 20
        progress(set_to=progress.n + 1)
    assert lines_of(out) == ["[train-student] 42/100 steps (42%), 20 s/step, elapsed 0:40, ETA 19:20"]
    progress(total=8)  # a new count (eval's next checkpoint) starts again
    assert progress.n == 0 and progress.total == 8
    progress(advance=8)
    progress(total=8)  # the same total again: still a new count
    assert progress.n == 0


def test_terminal_gets_a_bar_logs_get_lines_and_heartbeats_stop():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(Progress("eval", stream=Terminal()), Bar)
    assert isinstance(Progress("bench", stream=Terminal(), bar=False), Silent)
    lines = Progress("eval", stream=io.StringIO())
    assert isinstance(lines, LogLines) and lines.thread.is_alive()
    stop_all()  # what the CLI does when a stage raised
    assert not lines.thread.is_alive()


def test_cli_stage_logs_a_closing_line(tmp_path):
    result = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "d"), "--sequences", "00", "--frames", "2",
                                           "--beams", "8", "--azimuth-steps", "128"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^\[synth\] 2/2 scans \(100%\), .*elapsed \d+:\d\d, done$", result.output, re.M), result.output
