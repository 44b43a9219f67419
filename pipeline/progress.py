"""Progress of long stages, for people and for logs.

On a terminal a stage shows a tqdm bar. Anywhere else (nohup, SLURM, CI) a bar is either
nothing or a flood of carriage returns, and a slow run cannot be told from a hung one; there a
stage prints one plain line (done/total, rate, elapsed, ETA) at most every 30 s, and a heartbeat
thread keeps that pace (a line every 30-35 s, so well within a minute) even while one step or one
shard takes longer; then one closing line.

The pipeline calls `progress(total=, advance=, set_to=, postfix=)`; both kinds take those calls.
`total=` alone starts a new count (eval's next checkpoint); with `set_to=` (training steps) it
only sets the total.
"""
from __future__ import annotations

import sys
import threading
import time
import weakref

MIN_INTERVAL_S = 30.0  # no two lines closer than this
_live: weakref.WeakSet = weakref.WeakSet()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class LogLines:
    """Progress as log lines; `clock` is injectable so the timing rules can be tested without sleeping."""

    def __init__(self, desc: str, unit: str = "scan", stream=None, clock=time.monotonic, heartbeat: bool = True,
                 min_interval_s: float = MIN_INTERVAL_S):
        self.desc, self.unit, self.stream, self.clock = desc, unit, stream or sys.stderr, clock
        self.min_interval_s = min_interval_s
        self.total, self.n, self.postfix = None, 0, {}
        self.started = self.last_line = clock()
        self.rate_from = (self.started, 0)  # (time, n) the rate is measured from: resets and resumed steps
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None
        if heartbeat:
            self.thread = threading.Thread(target=self._beat, name=f"progress-{desc}", daemon=True)
            self.thread.start()
        _live.add(self)

    def __call__(self, total=None, done=None, advance=None, postfix=None, set_to=None):
        with self.lock:
            now = self.clock()
            if total is not None and (set_to is None or total != self.total):  # a new count (eval's next checkpoint)
                self.total, self.n, self.rate_from = total, 0, (now, 0)
            if set_to is not None:
                if self.n == 0 and self.rate_from[1] == 0:  # a resumed run: rate from where it starts
                    self.rate_from = (now, set_to)
                self.n = set_to
            self.n += (done or 0) + (advance or 0)
            if postfix:
                self.postfix.update(postfix)
            self._maybe_line(now)

    def poll(self) -> None:
        """What the heartbeat thread calls; a line if the last one is min_interval_s old."""
        with self.lock:
            self._maybe_line(self.clock())

    def line(self, now: float, closing: bool = False) -> str:
        elapsed = now - self.started
        t0, n0 = self.rate_from
        rate = (self.n - n0) / (now - t0) if now > t0 and self.n > n0 else None
        count = f"{self.n}/{self.total} {self.unit}s" if self.total else f"{self.n} {self.unit}s"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"[{self.desc}] {count}",
                 f"{rate:.3g} {self.unit}s/s" if rate and rate >= 0.1 else f"{1 / rate:.3g} s/{self.unit}" if rate else "rate -",
                 f"elapsed {duration(elapsed)}"]
        if closing:
            parts.append("done")
        elif self.total and rate:
            parts.append(f"ETA {duration(max(0, self.total - self.n) / rate)}")
        else:
            parts.append("ETA -")
        shown = ", ".join(f"{k}={_value(v)}" for k, v in list(self.postfix.items())[:6])
        return ", ".join(parts) + (f" | {shown}" if shown else "")

    def _maybe_line(self, now: float) -> None:
        if now - self.last_line >= self.min_interval_s:
            self._write(self.line(now), now)

    def _write(self, text: str, now: float) -> None:
        print(text, file=self.stream, flush=True)
        self.last_line = now

    def _beat(self) -> None:
        # waking every few seconds keeps lines within a few seconds of min_interval_s
        while not self.stop.wait(min(5.0, self.min_interval_s / 6)):
            self.poll()

    def halt(self) -> None:
        """Stop the heartbeat without a closing line (the stage failed)."""
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        _live.discard(self)

    def close(self) -> None:
        self.halt()
        with self.lock:
            now = self.clock()
            self._write(self.line(now, closing=True), now)


class Bar:
    """The same calls on a tqdm bar."""

    def __init__(self, desc: str, unit: str = "scan", stream=None):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True, file=stream or sys.stderr)

    def __call__(self, total=None, done=None, advance=None, postfix=None, set_to=None):
        if total is not None and (set_to is None or total != self.bar.total):
            self.bar.reset(total=total)
        if set_to is not None:
            self.bar.n = set_to
            self.bar.refresh()
        if done:
            self.bar.update(done)
        if advance:
            self.bar.update(advance)
        if postfix:
            self.bar.set_postfix({k: _value(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def halt(self) -> None:
        self.bar.close()


class Silent:
    """Takes the calls and shows nothing."""

    def __call__(self, **kwargs):
        pass

    def close(self) -> None:
        pass

    halt = close


def Progress(desc: str, unit: str = "scan", stream=None, bar: bool = True):
    """A bar when the stream (stderr by default) is a terminal, log lines otherwise. bar=False:
    nothing on a terminal (a stage that prints its own lines there, which a bar would garble)."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return Bar(desc, unit, stream) if bar else Silent()
    return LogLines(desc, unit, stream)


def stop_all() -> None:
    """Stop every heartbeat still running (a stage that raised never closed its progress)."""
    for progress in list(_live):
        progress.halt()


class StageBars:
    """One progress at a time for a multi-stage command: calling it with a stage name closes the
    previous stage's progress and opens the next."""

    def __init__(self):
        self.bar = None

    def __call__(self, name: str):
        self.close()
        unit = "step" if name.startswith("train") else "scan"
        self.bar = Progress(name, unit=unit)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
