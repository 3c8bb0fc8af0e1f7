"""Stream samples into per-split shards; write manifest.json last, atomically.

Memory stays flat: a sample is encoded, appended to its split's open tar, and dropped.
A dataset folder without manifest.json is incomplete by definition.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable, Optional

from .format import FORMAT_VERSION, MANIFEST, index_name, shard_name
from .sample import Sample
from .tar_io import TarShardWriter

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(str(path) + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


class DatasetWriter:
    """Usage: `with DatasetWriter(out, cfg.shard, preprocess=...) as w: w.write(sample)`."""

    def __init__(self, out: str | Path, shard_cfg, *, preprocess: dict, patient_splits: dict[str, str],
                 source: Optional[dict] = None, cases_total: Optional[int] = None,
                 patient_id_fallbacks: Optional[list[dict]] = None,
                 on_case: Optional[Callable[[str, Optional[str]], None]] = None):
        """on_case(outcome, reason): told of each case, written (reason None) or rejected; the
        caller's metrics hook (data_shards knows nothing of the exporter)."""
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / MANIFEST).exists():
            (self.out / MANIFEST).unlink()  # rewriting: the old dataset is no longer complete
        self.cfg = shard_cfg
        self.preprocess = asdict(preprocess) if is_dataclass(preprocess) else dict(preprocess)
        self.patient_splits = patient_splits
        self.source = source or {}
        self._open: dict[str, TarShardWriter] = {}
        self._next: dict[str, int] = {}
        self.shards: list[dict] = []
        self.rejected: list[dict] = []
        self.written = 0
        self.cases_total = cases_total
        # cases whose patient id came from the file name because the scan's own could not be read:
        # listed in ingest_report.json, since a wrong id can put one patient in two splits
        self.patient_id_fallbacks = list(patient_id_fallbacks or [])
        self.mask_gaps: list[dict] = []  # written samples whose mask lacks an anatomy
        self.on_case = on_case or (lambda outcome, reason: None)


    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()

    def write(self, sample: Sample) -> None:
        pid = sample.meta.get("patient_id")
        split = self.patient_splits.get(pid)
        if split is None:
            raise KeyError(f"{sample.key}: patient {pid!r} has no split assignment")
        sample.split = split
        members = sample.encode(self.cfg.codec)
        w = self._open.get(split)
        size = sum(len(d) for _, d in members)
        if w is not None and (len(w.entries) >= self.cfg.max_samples or w.nbytes + size > self.cfg.max_bytes):
            self._finish(split)
            w = None
        if w is None:
            i = self._next.get(split, 0)
            self._next[split] = i + 1
            w = self._open[split] = TarShardWriter(self.out / shard_name(split, i))
        w.add_sample(sample.key, members)
        self.written += 1
        self.on_case("written", None)

    def reject(self, case: str, reason: str) -> None:
        log.warning("rejected %s: %s", case, reason)
        self.rejected.append({"case": case, "reason": reason})
        self.on_case("rejected", reason)

    def note_mask_gap(self, gap: dict) -> None:
        """A written sample whose mask lacks anatomies ({case, missing, empty}): kept, and listed
        in ingest_report.json with a count per anatomy."""
        log.info("%s: mask without %s", gap["case"], ", ".join(gap["missing"] + gap["empty"]))
        self.mask_gaps.append(gap)

    def _finish(self, split: str) -> None:
        w = self._open.pop(split)
        info = w.close()
        self.shards.append({"name": w.path.name, "index": index_name(w.path.name), "split": split,
                            "keys": [e.key for e in w.entries], **info})

    def close(self) -> dict:
        for split in list(self._open):
            self._finish(split)
        self.shards.sort(key=lambda s: s["name"])
        splits: dict[str, dict] = {}
        for pid, s in sorted(self.patient_splits.items()):
            splits.setdefault(s, {"patients": [], "samples": 0})["patients"].append(pid)
        for sh in self.shards:
            splits.setdefault(sh["split"], {"patients": [], "samples": 0})["samples"] += sh["samples"]
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "codec": self.cfg.codec,
            "label_set": self.cfg.label_set,
            "preprocessing": self.preprocess,
            "source": self.source,
            "num_samples": self.written,
            "num_rejected": len(self.rejected),
            "splits": splits,
            "shards": self.shards,
        }
        cases = self.written + len(self.rejected)
        write_json_atomic(self.out / "ingest_report.json", {
            "cases_in": self.cases_total if self.cases_total is not None else cases,
            "samples_written": self.written, "rejected": len(self.rejected), "rejects": self.rejected,
            "patient_id_fallbacks": self.patient_id_fallbacks,
            "mask_gaps": self.mask_gaps, "mask_gap_counts": _gap_counts_of(self.mask_gaps)})
        write_json_atomic(self.out / MANIFEST, manifest)
        return manifest


def _gap_counts_of(gaps: list[dict]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for g in gaps:
        for kind in ("missing", "empty"):
            for a in g[kind]:
                out.setdefault(a, {"missing": 0, "empty": 0})[kind] += 1
    return out


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a ctvlp dataset, or its writing did not finish "
                                f"(re-run `ctvlp shard` or `ctvlp synth`)")
    m = json.loads(path.read_text())
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {m.get('format_version')} but this ctvlp reads "
                         f"{FORMAT_VERSION}; re-shard the data")
    return m
