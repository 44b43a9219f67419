"""Training/eval input pipeline over prepared shards (and, for the student, the teacher cache).

One sample = one scan: coordinates (optionally augmented), remission, training labels,
hard-class instance keys, and, with a cache, the teacher's logits for every single-scan point
and its features for the hard-class points. Per-sample randomness comes from
(seed, epoch, index), so results do not depend on the number of loader workers and a resumed
run sees exactly the samples an uninterrupted one would.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset_spec import DatasetSpec
from .errors import StaleInputError
from .manifest import read_manifest
from .ragged import RaggedReader
from .rundir import RunDir
from .instances import instance_key
from .teacher_cache import decode_features, stored_logits
from .transforms import AugmentConfig, augment_xyz, voxel_coords

INPUT_KINDS = ("single", "fused")


class ScanDataset(Dataset):
    def __init__(self, run_dir, spec: DatasetSpec, splits=("train",), input_kind="single", voxel_size=0.05,
                 augment: AugmentConfig | None = None, seed=0, with_cache=False, max_scans=None, sequences=None,
                 label_fused: bool = True, skip_empty: bool = False):
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}")
        self.run = RunDir(run_dir)
        manifest, self.manifest_meta = read_manifest(self.run.manifest)
        self.manifest_fingerprint = self.manifest_meta["content_fingerprint"]
        mask = manifest["split"].isin(list(splits))
        if skip_empty:  # a scan without points has nothing to learn from or to score
            mask &= manifest["n_single"] > 0
        if sequences:
            mask &= manifest["sequence"].isin(list(sequences))
        rows = manifest[mask]
        if max_scans:
            rows = rows.iloc[np.linspace(0, len(rows) - 1, min(max_scans, len(rows))).astype(int)] if len(rows) else rows
        self.rows = rows.reset_index(drop=True)
        if len(self.rows) == 0:
            raise StaleInputError(f"{self.run.manifest}: no scans in splits {list(splits)}")
        self.spec = spec
        self.input_kind = input_kind
        self.voxel_size = voxel_size
        self.augment = augment
        self.seed = seed
        self.with_cache = with_cache
        self.label_fused = label_fused
        self._readers: dict[str, RaggedReader] = {}
        self._readers_pid = os.getpid()
        # plain arrays: cheap to pickle into loader workers, no pandas in the hot path
        self._shard = self.rows["shard"].to_numpy()
        self._index = self.rows["shard_index"].to_numpy()
        self._n_single = self.rows["n_single"].to_numpy()
        self._n_fused = self.rows["n_fused"].to_numpy()
        self._labelled = self.rows["has_labels"].to_numpy()

    def __len__(self) -> int:
        return len(self.rows)

    def _reader(self, path: Path) -> RaggedReader:
        if self._readers_pid != os.getpid():  # a loader worker: an object store's client is per process
            self._readers, self._readers_pid = {}, os.getpid()
        key = str(path)
        if key not in self._readers:
            self._readers[key] = RaggedReader(path)
        return self._readers[key]

    def __getitem__(self, key) -> dict:
        """key: index, or (index, epoch) from a ResumableBatchSampler (epoch seeds augmentation)."""
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        n_single = int(self._n_single[i])
        n = n_single + (int(self._n_fused[i]) if self.input_kind == "fused" else 0)
        shard = self._reader(self.run.prepare / self._shard[i])
        data = shard.read(int(self._index[i]), names=["points", "label"], rows=slice(0, n))
        points, raw = data["points"], data["label"]
        train = self.spec.learning_lut[raw & 0xFFFF].astype(np.int64)
        if not self.label_fused:
            train[n_single:] = 0  # fused points stay in the input as context, out of the loss
        xyz = points[:, :3]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            xyz = augment_xyz(xyz, rng, self.augment)
        sample = {
            "index": i,
            "coords": voxel_coords(xyz, self.voxel_size),
            "feats": np.concatenate([xyz, points[:, 3:4]], axis=1).astype(np.float32),
            "label": train,
            "instance": instance_key(train, raw >> 16, self.spec.hard_mask),
            "n_single": n_single,
        }
        if self.with_cache:
            cache = self._reader(self.run.teacher_cache / self._shard[i])
            sample["teacher_logits"] = stored_logits(cache, int(self._index[i]), self.spec.num_classes)
            hard = cache.read(int(self._index[i]), rowset="hard")
            sample["teacher_feats"] = decode_features(hard)
            sample["teacher_feat_index"] = hard["point_index"].astype(np.int64)
        return sample


def collate(samples: list[dict]) -> dict:
    """Concatenate scans; prepend the batch index to coordinates; make instance keys batch-unique."""
    counts = [len(s["label"]) for s in samples]
    starts = np.concatenate([[0], np.cumsum(counts)])
    batch_idx = np.repeat(np.arange(len(samples), dtype=np.int32), counts)
    coords = np.concatenate([s["coords"] for s in samples])
    instance = np.concatenate([np.where(s["instance"] > 0, s["instance"] | (b << 24), 0) for b, s in enumerate(samples)])
    out = {
        "coords": torch.from_numpy(np.concatenate([batch_idx[:, None], coords], axis=1)),
        "feats": torch.from_numpy(np.concatenate([s["feats"] for s in samples])),
        "label": torch.from_numpy(np.concatenate([s["label"] for s in samples])),
        "instance": torch.from_numpy(instance),
        "offsets": torch.from_numpy(starts),
        "n_single": torch.tensor([s["n_single"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
    }
    if "teacher_logits" in samples[0]:
        out["teacher_logits"] = torch.from_numpy(np.concatenate([s["teacher_logits"] for s in samples]))
        out["teacher_feats"] = torch.from_numpy(np.concatenate([s["teacher_feats"] for s in samples]))
        out["teacher_feat_index"] = torch.from_numpy(np.concatenate([s["teacher_feat_index"] + starts[b] for b, s in enumerate(samples)]))
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class ResumableBatchSampler:
    """Batches of (index, epoch) for global steps [start_step, total_steps).

    The order is a per-epoch permutation seeded by (seed, epoch); step s covers global sample
    positions [s * B * world, (s + 1) * B * world) and rank r takes its own B of them. So the
    sequence depends only on (seed, step), which is what makes --resume exact and splits the
    data across DistributedDataParallel ranks without overlap.
    """

    def __init__(self, n: int, batch_size: int, total_steps: int, seed: int = 0, start_step: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.total_steps = n, batch_size, total_steps
        self.seed, self.start_step, self.rank, self.world = seed, start_step, rank, world
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch, 7919]).permutation(self.n)}
        return self._orders[epoch]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self):
        global_batch = self.batch_size * self.world
        for step in range(self.start_step, self.total_steps):
            first = step * global_batch + self.rank * self.batch_size
            batch = []
            for pos in range(first, first + self.batch_size):
                epoch, offset = divmod(pos, self.n)
                batch.append((int(self._order(epoch)[offset]), epoch))
            yield batch


class RawScanDataset(Dataset):
    """Scans straight from a SemanticKITTI layout, at full resolution (evaluation, submission)."""

    def __init__(self, data_root, sequences, spec: DatasetSpec, voxel_size: float):
        from . import semantickitti as sk

        self.sk = sk
        self.spec = spec
        self.voxel_size = voxel_size
        self.items = []
        for name in sequences:
            seq = sk.Sequence(data_root, name)
            self.items.extend((seq, frame) for frame in seq.frames)
        if not self.items:
            raise StaleInputError(f"{data_root}: no scans in sequences {list(sequences)}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        seq, frame = self.items[i]
        points = self.sk.read_scan(seq.scan_path(frame))
        if seq.has_labels:
            raw = self.sk.read_label(seq.label_path(frame), len(points), self.spec.learning_lut)
            train = self.spec.learning_lut[raw & 0xFFFF].astype(np.int64)
            instance = instance_key(train, raw >> 16, self.spec.hard_mask)  # the sparse-instance analysis
        else:
            train = np.zeros(len(points), np.int64)
            instance = np.zeros(len(points), np.int64)
        return {
            "index": i,
            "coords": voxel_coords(points[:, :3], self.voxel_size),
            "feats": np.ascontiguousarray(points, dtype=np.float32),
            "label": train,
            "instance": instance,
            "n_single": len(points),
        }
