"""Join per-finding labels to samples by key, from a CSV or a Parquet file.

Accepts the silver-label Parquet of `ctvlp label` (key + one hard-label column per finding;
rows that failed to label give NaN),
CT-RATE label CSVs (VolumeName) and dev-style CSVs (AccessionNo). Values stay as given:
1 / 0 / -1 (uncertain); how -1 is treated is the training stage's choice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_shards.format import KEY_COLUMNS, strip_volume_ext


class LabelTable:
    def __init__(self, keys: list[str], values: np.ndarray, names: list[str]):
        self.names = list(names)
        self.values = values.astype(np.float32)
        self._row = {strip_volume_ext(str(k)): i for i, k in enumerate(keys)}

    @classmethod
    def from_file(cls, path: str | Path, names: list[str]) -> "LabelTable":
        path = Path(path)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            cols = pq.read_table(path).to_pydict()
        else:
            import csv

            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            cols = {k: [r[k] for r in rows] for k in (rows[0].keys() if rows else [])}
        key_col = next((c for c in KEY_COLUMNS if c in cols), None)
        if key_col is None:
            raise ValueError(f"{path}: no key column; expected one of {KEY_COLUMNS}")
        missing = [n for n in names if n not in cols]
        if missing:
            raise ValueError(f"{path}: missing label column(s) {missing[:3]}{'...' if len(missing) > 3 else ''}")
        # a report that failed to label has null labels: NaN, for the training stage to mask
        vals = np.array([[np.nan if v is None or v == "" else float(v) for v in cols[n]] for n in names],
                        dtype=np.float32).T
        return cls([str(k) for k in cols[key_col]], vals.reshape(len(cols[key_col]), len(names)), names)

    def lookup(self, keys: list[str]) -> np.ndarray:
        rows = [self._row.get(k) for k in keys]
        absent = [k for k, r in zip(keys, rows) if r is None]
        if absent:
            raise KeyError(f"{len(absent)} sample(s) have no labels, e.g. {absent[:3]}; "
                           f"label the whole dataset or restrict the split")
        return self.values[rows]

    def __contains__(self, key: str) -> bool:
        return key in self._row


class OrganTexts:
    """fVLM's per-organ texts and normal flags from `ctvlp label split`'s Parquet, by key. A
    report whose split failed has no texts (None): the fVLM stage masks all its organs."""

    def __init__(self, path: str | Path, anatomies: list[str]):
        import pyarrow.parquet as pq

        cols = pq.read_table(path).to_pydict()
        missing = [c for a in anatomies for c in (f"text__{a}", f"normal__{a}") if c not in cols]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]}: split the reports into these anatomies "
                             f"(ctvlp label split --anatomy-map ...) or change model.anatomies")
        self.anatomies = list(anatomies)
        self._rows = {}
        for i, k in enumerate(cols["key"]):
            ok = cols["status"][i] == "ok"
            self._rows[strip_volume_ext(str(k))] = (
                [cols[f"text__{a}"][i] for a in anatomies] if ok else None,
                [bool(cols[f"normal__{a}"][i]) if ok else False for a in anatomies])

    def lookup(self, keys: list[str]) -> tuple[list, np.ndarray]:
        absent = [k for k in keys if k not in self._rows]
        if absent:
            raise KeyError(f"{len(absent)} sample(s) have no organ texts, e.g. {absent[:3]}; run "
                           f"`ctvlp label split` on the whole dataset")
        rows = [self._rows[k] for k in keys]
        return [t for t, _ in rows], np.array([n for _, n in rows], dtype=bool).reshape(len(keys), -1)
