"""Prompts and the JSON schema, generated from the label set (never written per set), and
the hash that identifies a labelling run's settings for resume."""
from __future__ import annotations

import hashlib
import json

from data_shards.label_sets import LabelSet

SYSTEM = ("You are a radiologist. You read chest CT reports and state which findings they describe as present. "
          "A finding that the report negates or does not mention is absent.")


def _describe(f) -> str:
    syn = f" (also: {', '.join(f.synonyms)})" if f.synonyms else ""
    return f"{f.name}: {f.definition}{syn}"


def json_schema(ls: LabelSet) -> dict:
    return {"type": "object", "properties": {f.name: {"type": "boolean"} for f in ls.findings},
            "required": ls.names, "additionalProperties": False}


def json_messages(ls: LabelSet, report: str) -> list[dict]:
    lines = "\n".join(f"- {_describe(f)}" for f in ls.findings)
    user = (f"Report:\n{report.strip()}\n\nFindings:\n{lines}\n\n"
            f"Answer with one JSON object mapping each finding name to true (present) or false (absent).")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def yesno_messages(ls: LabelSet, report: str, finding) -> list[dict]:
    """Report first, question last: every finding's prompt shares the report as a cached prefix."""
    user = (f"Report:\n{report.strip()}\n\nQuestion: Does the report describe {finding.name} as present? "
            f"{finding.name} means: {finding.definition} Answer yes or no.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def settings_hash(ls: LabelSet, backend: str, model_id: str, scoring: str) -> str:
    """Changes whenever the labels could change: label set, prompts, schema, backend, model."""
    from pathlib import Path

    from . import rules

    payload = {"label_set": ls.name, "findings": [(f.name, f.definition, f.synonyms) for f in ls.findings],
               "backend": backend, "model": model_id, "scoring": scoring, "system": SYSTEM,
               "json_probe": json_messages(ls, "<R>"), "yesno_probe": [yesno_messages(ls, "<R>", f) for f in ls.findings],
               # any edit to the rules (patterns, cues, scores) must relabel
               "rules": Path(rules.__file__).read_text() if backend == "rules" else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]
