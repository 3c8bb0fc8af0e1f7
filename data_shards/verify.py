"""`ctvlp verify DIR`: check every shard against the manifest; name the shard and sample at fault.

Checks: files present, byte size and sha256, tar integrity and safe member names, sample
counts and keys, index equal to a freshly computed one, every sample decodable with the
manifest's shape and dtype, non-empty report, no patient in two splits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .format import VOLUME_EXT
from .sample import decode_members
from .tar_io import ShardError, read_index, sha256_file
from .writer import load_manifest


@dataclass
class VerifyResult:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.shards} shards, {self.samples} samples checked: "
        if self.ok:
            return head + "OK"
        return head + f"{len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)


def verify_dataset(root: str | Path, decode: bool = True, progress=None) -> VerifyResult:
    from .tar_io import iter_tar_samples

    root = Path(root)
    res = VerifyResult()
    try:
        man = load_manifest(root)
    except (FileNotFoundError, ValueError) as e:
        res.problems.append(str(e))
        return res
    shape = tuple(man["preprocessing"].get("stored_shape", ())) or None
    codec = man["codec"]
    seen_patient: dict[str, str] = {}
    for pid_split, info in man.get("splits", {}).items():
        for pid in info.get("patients", []):
            if pid in seen_patient:
                res.problems.append(f"patient {pid} is in splits {seen_patient[pid]} and {pid_split}")
            seen_patient[pid] = pid_split
    shards = man["shards"]
    it = progress(shards) if progress else shards
    total = 0
    for sh in it:
        res.shards += 1
        name, path = sh["name"], root / sh["name"]
        if not path.exists():
            res.problems.append(f"{name}: missing shard file")
            continue
        size = path.stat().st_size
        if size != sh["bytes"]:
            res.problems.append(f"{name}: size {size} bytes, manifest says {sh['bytes']} (truncated or replaced)")
        digest = sha256_file(path)
        if digest != sh["sha256"]:
            res.problems.append(f"{name}: sha256 checksum mismatch (manifest {sh['sha256'][:12]}..., file {digest[:12]}...)")
        keys, seen_index = [], []
        try:
            for key, members in iter_tar_samples(path, index=seen_index):
                keys.append(key)
                res.samples += 1
                try:
                    if not decode:
                        for ext in (VOLUME_EXT[codec], "json", "txt"):
                            if ext not in members:
                                raise ValueError(f"sample {key}: missing member {key}.{ext}")
                        continue
                    s = decode_members(key, members)
                    if shape and s.volume.shape != shape:
                        raise ValueError(f"sample {key}: shape {s.volume.shape}, manifest stored_shape {shape}")
                    if s.meta.get("split") != sh["split"]:
                        raise ValueError(f"sample {key}: metadata split {s.meta.get('split')!r} in a {sh['split']} shard")
                    pid = s.meta.get("patient_id")
                    if seen_patient and seen_patient.get(pid) != sh["split"]:
                        raise ValueError(f"sample {key}: patient {pid} belongs to split {seen_patient.get(pid)!r}, "
                                         f"found in a {sh['split']} shard")
                except ValueError as e:
                    res.problems.append(f"{name}: {e}")
        except ShardError as e:
            res.problems.append(str(e))
            continue
        if len(keys) != sh["samples"]:
            res.problems.append(f"{name}: {len(keys)} samples in tar, manifest says {sh['samples']}")
        elif sh.get("keys") and keys != sh["keys"]:
            res.problems.append(f"{name}: sample keys differ from the manifest's")
        total += len(keys)
        idx_path = root / sh["index"]
        try:
            if [e.line() for e in read_index(idx_path)] != [e.line() for e in seen_index]:
                res.problems.append(f"{name}: index {sh['index']} does not match the tar")
        except (ShardError, FileNotFoundError, OSError) as e:
            res.problems.append(f"{name}: index: {e}")
    if total != man["num_samples"] and not res.problems:
        res.problems.append(f"dataset: {total} samples in shards, manifest says {man['num_samples']}")
    return res
