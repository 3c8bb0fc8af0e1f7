"""The labels file: one Parquet row per report, written atomically, resumable.

Columns: key, status, backend, model, settings_hash, tokens_in, tokens_out, attempts,
raw_output, then per finding `<name>` (hard label 1 / 0 / -1) and `<name>__prob`.
Completed batches land in `<out>.parts/` (each part written atomically), so a crash loses at
most the batches in flight; the final file is written last, to a temporary name, then renamed.
A re-run skips keys already labelled OK with the same settings hash.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
BASE_COLUMNS = ["key", "status", "backend", "model", "settings_hash", "tokens_in", "tokens_out", "attempts", "raw_output"]


def _schema(names: list[str]) -> pa.Schema:
    fields = [pa.field("key", pa.string()), pa.field("status", pa.string()), pa.field("backend", pa.string()),
              pa.field("model", pa.string()), pa.field("settings_hash", pa.string()), pa.field("tokens_in", pa.int64()),
              pa.field("tokens_out", pa.int64()), pa.field("attempts", pa.int32()), pa.field("raw_output", pa.string())]
    for n in names:
        fields += [pa.field(n, pa.int8()), pa.field(f"{n}__prob", pa.float32())]
    return pa.schema(fields)


def _atomic_write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class LabelStore:
    """`names`: the label columns; or a whole `schema` of one's own (the report split's)."""

    def __init__(self, out: str | Path, names: list[str], settings_hash: str, schema: pa.Schema | None = None):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.names, self.hash = names, settings_hash
        self.schema = schema if schema is not None else _schema(names)
        self._n = len(list(self.parts.glob("part-*.parquet"))) if self.parts.exists() else 0
        self.damaged: list[str] = []  # unreadable files met while reading back, each logged once

    def _existing(self) -> list[dict]:
        rows = []
        files = ([self.out] if self.out.exists() else []) + sorted(self.parts.glob("part-*.parquet"))
        for f in files:
            try:
                rows += pq.read_table(f).to_pylist()
            except Exception as e:  # a damaged leftover part is relabelled, not trusted, and said so
                if str(f) not in self.damaged:
                    self.damaged.append(str(f))
                    log.warning("label part %s is damaged (%s: %s): its reports are labelled again",
                                f, type(e).__name__, e)
        return rows

    def reusable(self) -> dict[str, dict]:
        """key -> row, for rows labelled OK with the same settings (later files win)."""
        return {r["key"]: r for r in self._existing() if self._good(r)}

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        _atomic_write(pa.Table.from_pylist(rows, schema=self.schema), self.parts / f"part-{self._n:06d}.parquet")
        self._n += 1

    def _good(self, r: dict) -> bool:
        return r.get("settings_hash") == self.hash and r.get("status") == "ok"

    def finalize(self, keys_in_order: list[str], metadata: dict, transform=None, schema: pa.Schema | None = None) \
            -> list[dict]:
        """Merge the old file and the parts: an OK row with our settings is kept; otherwise the
        newest row for a key wins. Only keys of this run's source are written, each through
        `transform` (columns derived at the end) into `schema` when given."""
        latest: dict[str, dict] = {}
        for r in self._existing():
            if self._good(r) or not self._good(latest.get(r["key"], {})):
                latest[r["key"]] = r
        rows = [latest[k] for k in keys_in_order if k in latest]
        if transform is not None:
            rows = [transform(r) for r in rows]
        schema = schema if schema is not None else self.schema
        table = pa.Table.from_pylist(rows, schema=schema.with_metadata({"ctvlp": json.dumps(metadata)}))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(table, self.out)
        shutil.rmtree(self.parts, ignore_errors=True)
        return rows


def read_labels(path: str | Path) -> tuple[list[dict], dict]:
    t = pq.read_table(path)
    meta = json.loads((t.schema.metadata or {}).get(b"ctvlp", b"{}"))
    return t.to_pylist(), meta
