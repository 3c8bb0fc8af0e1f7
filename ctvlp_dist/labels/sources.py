"""Where reports come from: a shard dataset (each sample's report) or a CSV.

CSV columns default to what the two real formats use: `AccessionNo` + `report_text`
(the CT-RATE dev file) and CT-RATE's `VolumeName` + `Findings_EN` + `Impressions_EN`.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Optional

from data_shards.format import KEY_COLUMNS, strip_volume_ext


def read_reports(src: str | Path, key_column: Optional[str] = None, text_column: Optional[str] = None) -> list[tuple[str, str]]:
    """-> [(key, report text)] in source order. Keys lose a .nii/.nii.gz suffix to match shard keys."""
    src = Path(src)
    if src.is_dir():
        return list(_from_shards(src))
    if not src.exists():
        raise FileNotFoundError(f"--reports {src} does not exist (give a shard dataset folder or a CSV)")
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        key = key_column or next((c for c in KEY_COLUMNS if c in cols), None)
        if key is None or key not in cols:
            raise ValueError(f"{src}: no key column (looked for {key_column or KEY_COLUMNS}); columns: {cols}. "
                             f"Use --key-column")
        if text_column:
            if text_column not in cols:
                raise ValueError(f"{src}: no column {text_column!r}; columns: {cols}")
            text = lambda r: r[text_column] or ""  # noqa: E731
        elif "report_text" in cols:
            text = lambda r: r["report_text"] or ""  # noqa: E731
        elif "Findings_EN" in cols:
            def text(r):
                fnd, imp = (r.get("Findings_EN") or "").strip(), (r.get("Impressions_EN") or "").strip()
                return "\n".join(([f"Findings: {fnd}"] if fnd else []) + ([f"Impression: {imp}"] if imp else []))
        else:
            raise ValueError(f"{src}: no report column (report_text, or Findings_EN + Impressions_EN); "
                             f"columns: {cols}. Use --text-column")
        out, seen = [], set()
        for row in reader:
            k = strip_volume_ext(str(row[key]).strip())
            if k in seen:
                raise ValueError(f"{src}: duplicate key {k!r}; keys must be unique")
            seen.add(k)
            out.append((k, text(row)))
        return out


def _from_shards(root: Path) -> Iterator[tuple[str, str]]:
    from data_shards.tar_io import read_index, read_sample_members
    from data_shards.writer import load_manifest

    man = load_manifest(root)
    for sh in man["shards"]:
        entries = read_index(root / sh["index"])
        with open(root / sh["name"], "rb") as f:
            for e in entries:
                if e.member("txt") is None:
                    yield e.key, ""
                    continue
                m = read_sample_members(f, type(e)(e.key, [x for x in e.members if x[0] == "txt"]))
                yield e.key, m["txt"].decode("utf-8", errors="replace")
