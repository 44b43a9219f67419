"""The one way m2skd writes a file or directory: under a temporary name, then renamed.

A temporary's name records who made it (host and process id), so a later run can tell an
abandoned one (its process is dead) from one a live process is still writing, and removes
only the former. Two processes writing into one run directory never destroy each other's work.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
# <name>.tmp-<host>-<pid> for files and directories alike
_TEMP_RE = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)$")


def temp_path(path) -> Path:
    """The temporary name this process writes `path` under."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{_HOST}-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def is_abandoned(path) -> bool:
    """True for a temporary of this host whose writer process is gone."""
    m = _TEMP_RE.match(Path(path).name)
    if not m or m.group("host") != _HOST:
        return False
    pid = int(m.group("pid"))
    return pid != os.getpid() and not _process_alive(pid)


def is_temporary(path) -> bool:
    return _TEMP_RE.match(Path(path).name) is not None


def sweep_temporaries(directory, recursive: bool = True) -> int:
    """Remove abandoned temporaries (files or directories) under `directory`; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    candidates = directory.rglob("*.tmp-*") if recursive else directory.glob("*.tmp-*")
    for tmp in sorted(candidates, key=lambda p: len(p.parts)):
        if not tmp.exists() or not is_abandoned(tmp):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary into place: the only moment the final name appears."""
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and not path.is_symlink():
        old = temp_path(path.with_name(path.name + ".old"))
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path to write to; it replaces `path` only if the block succeeds.
    An fsspec URL gets a local temporary of the same name, uploaded whole (m2skd.storage.output)."""
    if "://" in str(path) and not str(path).startswith("file://"):
        from .storage import output

        with output(path) as tmp:
            yield tmp
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    if "://" in str(path) and not str(path).startswith("file://"):
        from .storage import write_bytes

        return write_bytes(path, data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path, obj) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path) -> dict:
    """A JSON file at a local path or fsspec URL."""
    if "://" in str(path) and not str(path).startswith("file://"):
        from .storage import read_bytes

        return json.loads(read_bytes(path))
    return json.loads(Path(path).read_text())
