"""Report CSVs keyed by volume name (CT-RATE style), with configurable columns."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from ..format import strip_volume_ext


def _norm_key(k: str) -> str:
    return strip_volume_ext(Path(k.strip()).name)


def load_reports(path: str | Path, key_column: str, findings_column: str, impressions_column: str,
                 text_column: Optional[str] = None) -> dict[str, str]:
    """volume name (extension stripped) -> report text with Findings/Impression sections."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        need = [key_column] + ([text_column] if text_column else [findings_column, impressions_column])
        missing = [c for c in need if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; columns are {cols}. "
                             f"Set ingest.key_column / ingest.findings_column / ingest.impressions_column "
                             f"or ingest.text_column")
        out = {}
        for row in reader:
            if text_column:
                text = (row.get(text_column) or "").strip()
            else:
                fnd = (row.get(findings_column) or "").strip()
                imp = (row.get(impressions_column) or "").strip()
                parts = ([f"Findings: {fnd}"] if fnd else []) + ([f"Impression: {imp}"] if imp else [])
                text = "\n".join(parts)
            out[_norm_key(row[key_column])] = text
    return out


def load_rescale_table(path: str | Path, key_column: str = "VolumeName") -> dict[str, tuple[float, float]]:
    """CT-RATE metadata CSV -> volume name -> (RescaleSlope, RescaleIntercept)."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                out[_norm_key(row[key_column])] = (float(row["RescaleSlope"]), float(row["RescaleIntercept"]))
            except (KeyError, ValueError):
                continue
    return out
