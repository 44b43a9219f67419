"""Where m2skd keeps its files: a local path or an fsspec URL (s3://, gs://, memory://, ...).

`path(x)` gives a `pathlib.Path` for a local path (every local write keeps m2skd.atomic's
temporary-then-rename, so local outputs are unchanged to the byte) and an `ObjectPath` for a
URL: the part of the Path interface the stages use (`/`, name, parent, exists, is_file, is_dir,
glob, read_bytes, ...) over the URL's fsspec file system. Credentials and endpoints come from
the client's own environment and configuration (AWS_* variables and ~/.aws for s3fs, fsspec's
FSSPEC_<PROTOCOL>_<OPTION> variables such as FSSPEC_S3_ENDPOINT_URL); m2skd adds no options.

Object stores have no rename, so publishing there works differently:
- one file is written to a local temporary (the very name a local write would use, so e.g. a
  torch checkpoint's bytes are the same) and uploaded as one object: an upload is committed only
  at its end (S3 and GCS alike), so the object is complete or absent;
- a file that is rewritten while readers may use it (a checkpoint) is uploaded under a unique
  name and a small pointer object under its own name is written last (`publish_versioned`);
  readers follow the pointer (`open_read`), and the superseded object is removed afterwards;
- a group of objects (a Zarr group) is uploaded object by object with its commit record
  written last (m2skd.ragged: the root `zarr.json` carrying the `complete` mark); readers
  require that record, so a killed writer leaves nothing a reader accepts.
"""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from .atomic import _HOST, is_abandoned, sweep_temporaries
from .errors import DataError

#: a pointer object: {POINTER_KEY: name of the object it points to, in the same folder}
POINTER_KEY = "m2skd_pointer"
_POINTER_MAGIC = b'{"' + POINTER_KEY.encode()
# <name>.v-<host>-<pid>-<n>: an object a pointer <name> refers to (or is about to)
_VERSION_RE = re.compile(r"^(?P<name>.+)\.v-(?P<host>[A-Za-z0-9_-]+?)-(?P<pid>\d+)-(?P<n>\d+)$")
_counter = itertools.count()
_EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(location) -> bool:
    """True for an fsspec URL other than file:// (which is a local path)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def path(location):
    """A Path for a local path (file:// included), an ObjectPath for any other URL."""
    if isinstance(location, (Path, ObjectPath)):
        return location
    text = os.fspath(location) if not isinstance(location, str) else location
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return ObjectPath(text) if is_url(text) else Path(text)


_FS_CACHE: dict = {}


@contextlib.contextmanager
def s3_endpoint(endpoint: str, bucket: str, key: str = "m2skd"):
    """Point s3fs at an S3-protocol server through the environment, as a user's settings would
    (AWS_ENDPOINT_URL and credentials), with `bucket` made; yields the bucket's URL and puts the
    environment back afterwards. For local servers (tests, the bench)."""
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": key, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _FS_CACHE.clear()
    try:
        filesystem(f"s3://{bucket}").mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        _FS_CACHE.clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def filesystem(url: str):
    """The fsspec file system of a URL (one per protocol and process, configured by the client's
    environment); a missing client is one line saying what to install."""
    protocol = url.split("://", 1)[0]
    key = (protocol, os.getpid())
    if key not in _FS_CACHE:
        import fsspec

        try:
            fs, _ = fsspec.core.url_to_fs(url)
        except ImportError:
            extra = _EXTRAS.get(protocol)
            hint = f"pip install 'm2skd[{extra}]'" if extra else f"install the fsspec client for {protocol}://"
            raise DataError(url, f"no client for {protocol}:// installed; {hint}") from None
        except ValueError as exc:
            raise DataError(url, f"not a usable URL ({exc})") from None
        _FS_CACHE[key] = fs
    return _FS_CACHE[key]


class ObjectPath:
    """A location in an fsspec file system, with the Path methods the stages use."""

    __slots__ = ("url", "protocol", "key")

    def __init__(self, url: str):
        protocol, rest = url.split("://", 1)
        rest = posixpath.normpath("/" + rest.strip("/")).lstrip("/") if rest.strip("/") else ""
        self.protocol, self.key = protocol, rest
        self.url = f"{protocol}://{rest}"

    # -- names ----------------------------------------------------------------------------
    @property
    def fs(self):
        return filesystem(self.url)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __fspath__(self):  # never silently opened as a local file
        raise TypeError(f"{self.url} is not a local path; use m2skd.storage")

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __truediv__(self, other) -> "ObjectPath":
        other = str(other)
        if is_url(other):
            return path(other)
        return ObjectPath(f"{self.protocol}://{posixpath.join(self.key, other)}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(f"{self.protocol}://{posixpath.dirname(self.key)}")

    @property
    def parents(self) -> list["ObjectPath"]:
        out, p = [], self
        while p.key:
            p = p.parent
            out.append(p)
        return out

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"{self.protocol}://", *self.key.split("/"))

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def relative_to(self, other) -> PurePosixPath:
        other = path(other)
        if not isinstance(other, ObjectPath) or other.protocol != self.protocol:
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.key).relative_to(other.key)

    def resolve(self) -> "ObjectPath":
        return self

    absolute = resolve

    # -- queries ----------------------------------------------------------------------------
    def _fresh(self):
        """The file system with its listing cache dropped: other processes write here too."""
        fs = self.fs
        fs.invalidate_cache()
        return fs

    def exists(self) -> bool:
        return self._fresh().exists(self.key)

    def is_file(self) -> bool:
        return self._fresh().isfile(self.key)

    def is_dir(self) -> bool:
        return self._fresh().isdir(self.key)

    def info(self) -> dict:
        try:
            return self._fresh().info(self.key)
        except FileNotFoundError:
            raise DataError(self.url, "not found") from None

    def iterdir(self):
        fs = self._fresh()
        if not fs.isdir(self.key):
            raise DataError(self.url, "not a folder")
        for entry in sorted(fs.ls(self.key, detail=False)):
            if entry.rstrip("/") != self.key:
                yield ObjectPath(f"{self.protocol}://{entry.rstrip('/')}")

    def find(self) -> dict[str, dict]:
        """{relative key: info} of every object under this prefix, in one listing."""
        fs = self._fresh()
        try:
            found = fs.find(self.key, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.key + "/"
        return {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}

    def glob(self, pattern: str):
        """Objects (and folders) matching a relative pattern, from one recursive listing."""
        depth = pattern.count("/") + 1
        names = set()
        for rel in self.find():
            parts = rel.split("/")
            for n in range(1, min(depth, len(parts)) + 1):
                names.add("/".join(parts[:n]))
        return [self / n for n in sorted(names) if n.count("/") + 1 == depth and fnmatch.fnmatchcase(n, pattern)]

    def rglob(self, pattern: str):
        names = set()
        for rel in self.find():
            parts = rel.split("/")
            names.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
        return [self / n for n in sorted(names) if fnmatch.fnmatchcase(posixpath.basename(n), pattern)]

    def stat(self):
        info = self.info()
        return os.stat_result((0, 0, 0, 0, 0, 0, int(info["size"]), 0, 0, 0))

    # -- reading and writing -------------------------------------------------------------
    def read_bytes(self) -> bytes:
        return read_bytes(self)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        write_bytes(self, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        write_bytes(self, text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object is under it."""

    def rmdir(self) -> None:
        """An empty prefix is gone already."""

    def unlink(self, missing_ok: bool = False) -> None:
        """Remove the object (and, for a pointer, the object it points to)."""
        fs = self._fresh()
        target = _pointer_target(self)
        try:
            fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise DataError(self.url, "not found") from None
        if target is not None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(target.key)


# -- generic operations on a local path or a URL ------------------------------------------

def _pointer_target(p: ObjectPath) -> ObjectPath | None:
    """The object a pointer at `p` names; None if `p` is absent or not a pointer."""
    fs = p.fs
    try:  # one ranged GET: most objects are not pointers
        if fs.cat_file(p.key, start=0, end=len(_POINTER_MAGIC)) != _POINTER_MAGIC:
            return None
        data = fs.cat_file(p.key)
    except FileNotFoundError:
        return None
    return p.with_name(json.loads(data)[POINTER_KEY])


def open_read(location):
    """A binary file object; a pointer object is followed to the object it names."""
    p = path(location)
    if isinstance(p, Path):
        try:
            return open(p, "rb")
        except FileNotFoundError:
            raise DataError(p, "file not found") from None
    target = _pointer_target(p) or p
    try:
        return target.fs.open(target.key, "rb", block_size=1 << 24)
    except FileNotFoundError:
        raise DataError(target.url, "not found") from None


def read_bytes(location) -> bytes:
    """A whole file; on a store one GET (two for a pointer)."""
    p = path(location)
    if isinstance(p, Path):
        with open_read(p) as fh:
            return fh.read()
    try:
        data = p.fs.cat_file(p.key)
    except FileNotFoundError:
        raise DataError(p.url, "not found") from None
    if data.startswith(_POINTER_MAGIC):
        target = p.with_name(json.loads(data)[POINTER_KEY])
        try:
            return target.fs.cat_file(target.key)
        except FileNotFoundError:
            raise DataError(target.url, "not found (its pointer names it)") from None
    return data


def read_json(location) -> dict:
    return json.loads(read_bytes(location))


def write_bytes(location, data: bytes) -> None:
    """Write a whole file: renamed into place locally, one upload (complete or absent) to a store."""
    p = path(location)
    if isinstance(p, Path):
        from .atomic import write_bytes_atomic

        write_bytes_atomic(p, data)
    else:
        p.fs.pipe_file(p.key, data)


def staging_root() -> Path:
    """Local folder for what is written before it is uploaded (one temporary folder per write,
    named after its process, so a later run removes those of dead processes)."""
    root = Path(os.environ.get("M2SKD_STAGING") or Path(tempfile.gettempdir()) / "m2skd-staging")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def local_stage(dest):
    """Yield a local temporary path named as m2skd.atomic.temp_path(dest) would name it (so what
    a writer puts in a file does not depend on where it goes); removed afterwards."""
    from .atomic import temp_path

    root = staging_root()
    sweep_temporaries(root, recursive=False)
    folder = root / f"stage-{next(_counter)}.tmp-{_HOST}-{os.getpid()}"
    folder.mkdir()
    try:
        yield folder / temp_path(Path(path(dest).name)).name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def upload_file(local: Path, dest: ObjectPath) -> None:
    dest.fs.put_file(str(local), dest.key)


@contextlib.contextmanager
def output(location, versioned: bool = False):
    """Yield a path to write one file to; it becomes `location` only if the block succeeds.
    Locally m2skd.atomic.atomic_path (temporary, then rename); on a store one upload, or with
    `versioned` an upload under a unique name and a pointer written last (publish_versioned)."""
    p = path(location)
    if isinstance(p, Path):
        from .atomic import atomic_path

        with atomic_path(p) as tmp:
            yield tmp
        return
    with local_stage(p) as tmp:
        yield tmp
        if versioned:
            publish_versioned(tmp, p)
        else:
            upload_file(tmp, p)


def publish_versioned(local: Path, dest: ObjectPath) -> ObjectPath:
    """Upload under <name>.v-HOST-PID-N, then point <name> at it, then remove what it replaced."""
    old = _pointer_target(dest)
    target = dest.with_name(f"{dest.name}.v-{_HOST}-{os.getpid()}-{next(_counter)}")
    upload_file(local, target)
    dest.fs.pipe_file(dest.key, json.dumps({POINTER_KEY: target.name}).encode())
    if old is not None and old != target:
        with contextlib.suppress(FileNotFoundError):
            dest.fs.rm_file(old.key)
    return target


def _versions(d: ObjectPath, found: dict) -> dict[str, bool]:
    """{relative key: referenced} of every versioned object under `d`: only the pointers that
    have versions beside them are read."""
    versions = {rel: _VERSION_RE.match(posixpath.basename(rel)) for rel in found}
    versions = {rel: m for rel, m in versions.items() if m}
    referenced = set()
    for pointer in {posixpath.join(posixpath.dirname(rel), m.group("name")) for rel, m in versions.items()}:
        target = _pointer_target(d / pointer)
        if target is not None:
            referenced.add(target.relative_to(d).as_posix())
    return {rel: rel in referenced for rel in versions}


def sweep(directory) -> int:
    """Remove what dead writers left under `directory`: local temporaries (m2skd.atomic), or on a
    store the versioned objects no pointer names whose writer process is gone."""
    d = path(directory)
    if isinstance(d, Path):
        return sweep_temporaries(d)
    removed = 0
    for rel, referenced in _versions(d, d.find()).items():
        m = _VERSION_RE.match(posixpath.basename(rel))
        if not referenced and is_abandoned(f"x.tmp-{m.group('host')}-{m.group('pid')}"):
            with contextlib.suppress(FileNotFoundError):
                d.fs.rm_file((d / rel).key)
            removed += 1
    return removed


def leftovers(directory) -> list[str]:
    """What a finished stage must not leave behind: local temporaries; on a store, versioned
    objects no pointer names and Zarr groups without their commit record."""
    d = path(directory)
    if isinstance(d, Path):
        from .atomic import is_temporary

        return sorted(str(p) for p in d.rglob("*") if is_temporary(p))
    found = d.find()
    out = [rel for rel, referenced in _versions(d, found).items() if not referenced]
    groups = {rel.split(".zarr/", 1)[0] + ".zarr" for rel in found if ".zarr/" in rel}
    out += [g for g in groups if g + COMMIT_SUFFIX not in found]
    return sorted(str(d / rel) for rel in out)


COMMIT_SUFFIX = ".commit"


def commit_record(folder: ObjectPath) -> ObjectPath:
    """NAME.commit beside a folder of objects published together (a Zarr group): written after
    every object in the folder, removed before any of them; readers require it."""
    return folder.with_name(folder.name + COMMIT_SUFFIX)


def remove_tree(location) -> None:
    """Remove a folder; on a store its commit record first, so no reader accepts what is left."""
    p = path(location)
    if isinstance(p, Path):
        shutil.rmtree(p, ignore_errors=True)
        return
    fs = p.fs
    commit_record(p).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p.key, recursive=True)
    fs.invalidate_cache()


def tree_bytes(location) -> int:
    p = path(location)
    if isinstance(p, Path):
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return sum(int(info["size"]) for info in p.find().values())


def object_stamp(info: dict) -> str:
    """What changes when an object is rewritten: its ETag (S3), generation (GCS), else its time."""
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) not in (None, ""):
            return str(info[key]).strip('"')
    return ""


def upload_tree(local: Path, dest: ObjectPath) -> dict[str, list]:
    """Upload every file under `local` to `dest` in one concurrent batch; returns
    {relative key: [size, stamp]} of what is now under `dest`."""
    files = [f for f in sorted(local.rglob("*")) if f.is_file()]
    if files:
        dest.fs.put([str(f) for f in files], [(dest / f.relative_to(local).as_posix()).key for f in files])
    return {rel: [int(info["size"]), object_stamp(info)] for rel, info in dest.find().items()}


def put_tree(local: Path, dest) -> None:
    """Copy a local folder's files to `dest` (a local folder or a URL): logs, not published data."""
    d = path(dest)
    if isinstance(d, Path):
        shutil.copytree(local, d, dirs_exist_ok=True)
    elif local.is_dir():
        upload_tree(local, d)


def save_figure(fig, location, **savefig_kwargs) -> None:
    """matplotlib's savefig to a local path (as it always was) or, rendered in memory, as one object."""
    p = path(location)
    if isinstance(p, Path):
        fig.savefig(p, **savefig_kwargs)
        return
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=p.suffix.lstrip(".") or "png", **savefig_kwargs)
    write_bytes(p, buf.getvalue())


def write_csv(frame, location) -> None:
    """A DataFrame as CSV (no index), written like any other file here."""
    p = path(location)
    if isinstance(p, Path):
        frame.to_csv(p, index=False)
    else:
        write_bytes(p, frame.to_csv(index=False).encode())
