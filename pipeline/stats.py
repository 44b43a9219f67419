"""`m2skd stats`: class shares and hard-instance histograms of a labelled dataset, per split."""
from __future__ import annotations

from pathlib import Path

from m2skd import dataset_stats as ds
from m2skd import semantickitti as sk
from m2skd import storage
from m2skd.dataset_spec import DatasetSpec, load_spec
from m2skd.errors import DataError

from .evaluate import evenly_spaced
from .parallel import run_tasks


def run_stats(data_root, sequences=None, spec: DatasetSpec | None = None, jobs: int = 1, progress=None,
              max_scans: int | None = None) -> dict:
    """Shares and instance histograms over the labelled scans of `sequences` (default: every
    labelled sequence), for all of them together and for each split present. `max_scans`
    keeps, per split, the scans an eval limited to that many looks at."""
    spec = spec or load_spec()
    root = storage.path(data_root)
    names = list(sequences) if sequences else sk.list_sequences(root)
    tasks = []
    for name in names:
        seq = sk.Sequence(root, name)
        if not seq.has_labels:
            if sequences:
                raise DataError(seq.path / "labels", "missing: stats need labelled sequences")
            continue
        tasks += [(name, seq.scan_path(f), seq.label_path(f)) for f in seq.frames]
    if max_scans:
        by_split: dict[str, list] = {}
        for task in tasks:
            by_split.setdefault(spec.split_of(task[0]), []).append(task)
        tasks = [t for group in by_split.values() for t in (group[i] for i in evenly_spaced(len(group), max_scans))]
    if not tasks:
        raise DataError(root / "sequences", "no labelled scans found")
    if progress:
        progress(total=len(tasks))

    def one(task):
        name, scan, label = task
        counts, inst = ds.scan_stats(scan, label, spec)
        return name, counts, inst

    per_scan = run_tasks(one, tasks, jobs, on_done=(lambda *_: progress(advance=1)) if progress else None)
    per_scan.sort(key=lambda r: r[0])
    groups = {"all": per_scan}
    for split in sorted({spec.split_of(name) for name, _, _ in per_scan}):
        groups[split] = [r for r in per_scan if spec.split_of(r[0]) == split]
    out = {}
    for group, rows in groups.items():
        stats = ds.combine(rows, spec)
        out[group] = {
            "scans": stats.scans,
            "sequences": sorted({r[0] for r in rows}),
            "shares": ds.share_rows(stats, spec),
            "instances": ds.instance_histograms(stats, spec),
        }
    return out
