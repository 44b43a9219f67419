"""The ragged group writer against zarr's own: the same files, byte for byte (a group's metadata
document: the same JSON, written compactly)."""
import errno
import json
import os
import types

import numpy as np
import pytest
import zarr

from m2skd import ragged
from m2skd.ragged import ROWS_PER_CHUNK, RaggedReader, write_ragged

SHARD_LIKE = {"points": {"cname": "lz4", "clevel": 9}, "label": {"cname": "lz4", "clevel": 9}}


def reference_group(path, fields, attrs, extra_rows, compression):
    """The group as zarr's public API writes it: create_array per field, `arr[...] = values`,
    and the root attributes set once."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)

    def rowset(group, rows):
        counts = [len(a) for a in next(iter(rows.values()))]
        for name, parts in rows.items():
            flat = np.concatenate(parts)
            arr = group.create_array(name, shape=flat.shape, dtype=flat.dtype, chunks=(ROWS_PER_CHUNK,) + flat.shape[1:],
                                     compressors=ragged._compressor(flat.dtype, **compression.get(name, {})),
                                     chunk_key_encoding=ragged.CHUNK_KEY_ENCODING, config={"write_empty_chunks": True})
            arr[...] = flat
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        arr = group.create_array("offsets", shape=offsets.shape, dtype=offsets.dtype, compressors=ragged._compressor(offsets.dtype),
                                   chunk_key_encoding=ragged.CHUNK_KEY_ENCODING)
        arr[...] = offsets

    rowset(root, fields)
    for name, rows in extra_rows.items():
        rowset(root.create_group(name), rows)
    root.update_attributes(attrs)


def files_of(path):
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def direct_writes_supported(directory) -> bool:
    probe = os.path.join(directory, "o_direct_probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o666))
    except (OSError, AttributeError):
        return False
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return True


def count_direct_files(monkeypatch) -> list:
    done = []
    put_direct = ragged._Files._put_direct

    def counted(self, path, blob):
        written = put_direct(self, path, blob)
        done.extend([path] if written else [])
        return written

    monkeypatch.setattr(ragged._Files, "_put_direct", counted)
    return done


@pytest.mark.parametrize("in_pieces,direct", [(False, False), (True, False), (False, True)])
def test_writer_gives_zarrs_files(tmp_path, monkeypatch, in_pieces, direct):
    """...whether each scan's rows come as one array or as pieces (prepare: the single scan,
    then what fusion adds), one piece empty; whether the files go through the page cache or
    straight to the disk (O_DIRECT: every file, metadata too, padded to whole blocks and truncated)."""
    if direct and not direct_writes_supported(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    monkeypatch.setattr(ragged, "_DIRECT", direct)
    monkeypatch.setattr(ragged, "DIRECT_MIN_BYTES", 1)
    direct_files = count_direct_files(monkeypatch)
    rng = np.random.default_rng(3)
    # three scans over three chunks of rows, the second spanning all three (the last one padded),
    # smooth values that compress; a row set whose scans are all empty (offsets all zero: a chunk
    # of fill values, which zarr leaves out)
    counts = [150_000, 400_000, 60_000]
    points = [np.cumsum(rng.normal(size=(n, 4)), axis=0).astype(np.float32) for n in counts]
    labels = [rng.integers(0, 20, n).astype(np.int32) for n in counts]
    source = [np.zeros(n, np.uint8) for n in counts]
    extra = {"hard": {"feat": [rng.normal(size=(n, 8)).astype(np.float16) for n in (5, 0, 7)]},
             "none": {"feat": [np.zeros((0, 3), np.float32)] * 3}}
    attrs = {"sequence": "00", "x": 1.5, "rows": [{"frame": i} for i in range(3)]}
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    given = {"points": points, "label": labels, "source": source}
    if in_pieces:
        given = {name: [(a[:1000], a[1000:1000], a[1000:]) for a in scans] for name, scans in given.items()}
    write_ragged(ours, given, attrs, extra_rows=extra, compression=SHARD_LIKE)

    recorded = json.loads((ours / "zarr.json").read_text())["attributes"]
    reference_group(theirs, {"points": points, "label": labels, "source": source}, recorded, extra, SHARD_LIKE)
    mine, ref = files_of(ours), files_of(theirs)
    assert "none/offsets/c.0" not in mine and "points/c.2.0" in mine and "points/c.3.0" not in mine
    assert sorted(mine) == sorted(ref)
    groups = {"zarr.json", "hard/zarr.json", "none/zarr.json"}
    for rel in ref:
        if rel in groups:
            assert json.loads(mine[rel]) == json.loads(ref[rel]), rel
        else:
            assert mine[rel] == ref[rel], rel
    # the recorded chunk list is every chunk file, with its size and CRC-32
    assert sorted(recorded["chunk_files"]) == sorted(r for r in ref if not r.endswith("zarr.json"))
    assert len(direct_files) == (len(mine) if direct else 0)
    reader = RaggedReader(ours)
    np.testing.assert_array_equal(reader.read(1)["points"], points[1])
    np.testing.assert_array_equal(reader.read(2, rowset="hard")["feat"], extra["hard"]["feat"][2])
    assert reader.read(1, rowset="none")["feat"].shape == (0, 3)


def _scans(n_scans, rows=200_000):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(rows, 4)).astype(np.float32) for _ in range(n_scans)]


def test_an_error_while_appending_publishes_nothing(tmp_path):
    path = tmp_path / "g.zarr"
    with pytest.raises(KeyError):
        with ragged.RaggedWriter(path) as writer:
            for scan in _scans(4):
                writer.append({"points": scan})
            raise KeyError("the caller failed")
    assert list(tmp_path.iterdir()) == []  # no group, no temporary


def test_a_failed_chunk_write_is_raised_by_finish_and_publishes_nothing(tmp_path, monkeypatch):
    """The writer thread fails on the second chunk; the caller, which keeps appending (and waits
    whenever PENDING_SCANS scans are not yet packed), is not left waiting: no later scan is packed,
    finish raises the error, and nothing is published."""
    calls, appended = [], []

    def failing(codec, block):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return codec.encode(block.reshape(-1).view(np.uint8))

    monkeypatch.setattr(ragged, "_compress", failing)
    path = tmp_path / "g.zarr"
    with pytest.raises(OSError, match="disk full"):
        with ragged.RaggedWriter(path) as writer:
            for scan in _scans(8):  # 1.6M rows: 7 chunks
                writer.append({"points": scan})
                appended.append(1)
            writer.finish({})
    assert len(appended) == 8 and len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_the_caller_runs_at_most_pending_scans_ahead_of_the_writer_thread(tmp_path, monkeypatch):
    """Scans are packed into chunks by the writer thread; with that thread slow, append waits once
    PENDING_SCANS scans are not yet packed, so the scans held in memory stay bounded."""
    import time

    pack, packed, ahead = ragged.RaggedWriter._pack, [], []

    def slow_pack(self, scan):
        time.sleep(0.05)
        pack(self, scan)
        packed.append(1)

    monkeypatch.setattr(ragged.RaggedWriter, "_pack", slow_pack)
    scans = _scans(8)
    with ragged.RaggedWriter(tmp_path / "slow.zarr") as writer:
        for i, scan in enumerate(scans):
            writer.append({"points": scan})
            ahead.append(i + 1 - len(packed))
        writer.finish({})
    assert max(ahead) == ragged.RaggedWriter.PENDING_SCANS  # appended and not yet packed, the one being packed among them
    write_ragged(tmp_path / "whole.zarr", {"points": scans}, {})
    assert files_of(tmp_path / "slow.zarr") == files_of(tmp_path / "whole.zarr")


def test_a_failed_file_write_is_raised_by_finish_and_publishes_nothing(tmp_path, monkeypatch):
    """The thread that writes the files fails on the third (the disk full); the writer thread,
    which waits for it whenever three files are queued, is not left waiting, finish raises the
    error, and nothing is published."""
    written = []
    write_file = ragged._Files._write_file

    def failing(self, key, blob):
        written.append(key)
        if len(written) == 3:
            raise OSError("disk full")
        write_file(self, key, blob)

    monkeypatch.setattr(ragged._Files, "_write_file", failing)
    path = tmp_path / "g.zarr"
    with pytest.raises(OSError, match="disk full"):
        with ragged.RaggedWriter(path) as writer:
            for scan in _scans(8):  # 7 chunks, so the writer thread waits for the file thread
                writer.append({"points": scan})
            writer.finish({})
    assert len(written) == 3 and list(tmp_path.iterdir()) == []


def test_a_group_finished_without_waiting_is_the_group_a_waiting_finish_writes(tmp_path):
    """finish(wait=False) leaves the last chunks, the metadata and the rename to the writer thread
    and returns at once; its future's result is the group's bytes, and the files are the same."""
    scans = _scans(5)  # 4 chunks, the last one partial
    write_ragged(tmp_path / "waited.zarr", {"points": scans}, {"a": 1})
    with ragged.RaggedWriter(tmp_path / "later.zarr") as writer:
        for scan in scans:
            writer.append({"points": scan})
        published = writer.finish({"a": 1}, wait=False)
    assert published.result() == writer.nbytes > 0
    assert files_of(tmp_path / "later.zarr") == files_of(tmp_path / "waited.zarr")


def test_a_failure_after_a_finish_without_waiting_is_raised_by_its_future_and_publishes_nothing(tmp_path, monkeypatch):
    """The root metadata, the last file a group gets, fails after the caller has left the block: the
    future raises it, and neither the group nor its temporary is left."""
    write_file = ragged._Files._write_file

    def failing(self, key, blob):
        if key == "zarr.json":
            raise OSError("disk full")
        write_file(self, key, blob)

    monkeypatch.setattr(ragged._Files, "_write_file", failing)
    with ragged.RaggedWriter(tmp_path / "g.zarr") as writer:
        for scan in _scans(3):
            writer.append({"points": scan})
        published = writer.finish({}, wait=False)
    with pytest.raises(OSError, match="disk full"):
        published.result()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_file_system_without_o_direct_gets_buffered_writes(tmp_path, monkeypatch, refused_at):
    """Where O_DIRECT is refused (EINVAL on opening, as tmpfs does, or on the first write), the
    file is written through the page cache instead, and the writer stops trying: the same bytes."""
    tries = []

    def refusing(name):
        real = getattr(os, name)

        def call(*args):
            if name == "open" and args[1] & os.O_DIRECT:
                tries.append(args[0])
                if refused_at == "open":
                    raise OSError(errno.EINVAL, "Invalid argument")
            if name == "write" and refused_at == "write":
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(*args)
        return call

    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake_os.open, fake_os.write = refusing("open"), refusing("write")
    monkeypatch.setattr(ragged, "os", fake_os)
    monkeypatch.setattr(ragged, "_DIRECT", True)
    monkeypatch.setattr(ragged, "DIRECT_MIN_BYTES", 1)
    scans = _scans(3)
    write_ragged(tmp_path / "refused.zarr", {"points": scans}, {})
    assert len(tries) == 1  # refused once, then buffered for every later file
    monkeypatch.setattr(ragged, "_DIRECT", False)
    write_ragged(tmp_path / "buffered.zarr", {"points": scans}, {})
    assert files_of(tmp_path / "refused.zarr") == files_of(tmp_path / "buffered.zarr")


def test_scans_must_keep_their_fields_and_dtypes(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        with ragged.RaggedWriter(tmp_path / "a.zarr") as writer:
            writer.append({"x": np.zeros(3, np.float32)})
            writer.append({"x": np.zeros(3, np.float64)})
    with pytest.raises(ValueError, match="fields"):
        with ragged.RaggedWriter(tmp_path / "b.zarr") as writer:
            writer.append({"x": np.zeros(3, np.float32)})
            writer.append({"y": np.zeros(3, np.float32)})
    with pytest.raises(RuntimeError, match="without finish"):
        with ragged.RaggedWriter(tmp_path / "c.zarr") as writer:
            writer.append({"x": np.zeros(3, np.float32)})
    assert list(tmp_path.iterdir()) == []
