"""Per-anatomy report text for fVLM (`ctvlp label split`).

A report is cut into sentences; each sentence is assigned to one anatomy of the anatomy map or
to `other`, by rules (the label set's finding patterns, then the map's anatomy words) or by an
LLM under a JSON schema (one enum per sentence number: it can only assign, never paraphrase).
An organ is normal when the silver labels have none of its findings positive; its text is then
fVLM's template, "{Organ} shows no significant abnormalities.", else its sentences joined.
The split is scored against the synthetic cohort's sentence_truth.jsonl.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from data_shards.ingest.masks import AnatomyMap
from data_shards.label_sets import LabelSet

OTHER = "other"
GLOBAL = "global"  # a label set's anatomy for findings judged on the whole report
_HEADER = re.compile(r"\b(Findings|Impressions?|FINDINGS|IMPRESSIONS?)\s*:\s*")
_CUT = re.compile(r"(?<=[.;!?])\s+(?=[A-Z0-9(\"'])|\s*\n+\s*|\s*•\s*")


def report_sentences(text: str) -> list[str]:
    """Sentences as written (punctuation kept), without section headers and bullets."""
    text = _HEADER.sub("\n", text or "")
    return [s.strip() for s in _CUT.split(text) if s and s.strip(" .;")]


def normal_text(organ: str) -> str:
    return f"{organ[:1].upper()}{organ[1:]} shows no significant abnormalities."


def organ_findings(ls: LabelSet, amap: AnatomyMap) -> dict[str, list[str]]:
    """anatomy -> the label set's findings that belong to it."""
    return {a: [f.name for f in ls.findings if f.anatomy == a] for a in amap.anatomies}


class RulesSplitter:
    """A sentence goes to the anatomy of the first finding it mentions (the rules labeler's
    patterns, negated mentions included); a mention of a whole-report finding only sends it to
    `other`; a sentence with no mention goes to the first anatomy whose words it contains."""

    def __init__(self, ls: LabelSet, amap: AnatomyMap):
        from .rules import RulesLabeler

        self.labeler = RulesLabeler(ls)
        self.anatomy = {f.name: f.anatomy for f in ls.findings}
        self.organs = set(amap.anatomies)
        self.words = [(a, re.compile("|".join(f"(?:{w})" for w in ws), re.I)) for a, ws in zip(amap.anatomies, amap.words)
                      if ws]

    def assign(self, sentence: str) -> str:
        found = [self.anatomy.get(m.finding) for m in self.labeler.mentions(sentence)]
        organs = [a for a in found if a in self.organs]
        if organs:
            return organs[0]
        if found:
            return OTHER
        return next((a for a, w in self.words if w.search(sentence)), OTHER)


def organ_texts(sentences: list[str], assigned: list[str], positives: set[str], findings_of: dict[str, list[str]]) \
        -> tuple[dict[str, str], dict[str, bool], list[str]]:
    """-> (text per organ, normal flag per organ, abnormal organs that got no sentence).
    An abnormal organ without a sentence gets the names of its positive findings as its text."""
    texts, normal, bare = {}, {}, []
    for organ, names in findings_of.items():
        pos = [n for n in names if n in positives]
        normal[organ] = not pos
        mine = [s for s, a in zip(sentences, assigned) if a == organ]
        if normal[organ]:
            texts[organ] = normal_text(organ)
        elif mine:
            texts[organ] = " ".join(mine)
        else:
            texts[organ] = " ".join(f"{n}." for n in pos)
            bare.append(organ)
    return texts, normal, bare


# ---- the LLM backend's prompt and schema ---------------------------------------------------

SPLIT_SYSTEM = ("You are a radiologist. You sort the sentences of chest CT reports by the anatomy each one "
                "describes.")


def split_messages(sentences: list[str], anatomies: tuple[str, ...]) -> list[dict]:
    numbered = "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))
    names = ", ".join(anatomies)
    user = (f"Sentences:\n{numbered}\n\nFor each sentence number, answer the anatomy it describes: one of {names}, "
            f"or {OTHER} (anything else, several organs, or no organ). Answer with one JSON object mapping every "
            f"sentence number to one anatomy.")
    return [{"role": "system", "content": SPLIT_SYSTEM}, {"role": "user", "content": user}]


def split_schema(n: int, anatomies: tuple[str, ...]) -> dict:
    enum = {"enum": [*anatomies, OTHER]}
    keys = [str(i) for i in range(1, n + 1)]
    return {"type": "object", "properties": {k: enum for k in keys}, "required": keys, "additionalProperties": False}


def parse_split(text: str, n: int, anatomies: tuple[str, ...]) -> list[str]:
    """The model's JSON -> one anatomy per sentence; ValueError names what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"output is not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("output is not a JSON object")
    allowed = {*anatomies, OTHER}
    out = []
    for i in range(1, n + 1):
        v = obj.get(str(i))
        if v not in allowed:
            raise ValueError(f"sentence {i}: {v!r} is not one of {sorted(allowed)}")
        out.append(v)
    return out


# ---- scoring against the sentence truth ----------------------------------------------------

def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().rstrip(".;").strip().lower()


def score_split(rows: list[dict], truth_path: str | Path, anatomies: tuple[str, ...]) -> dict:
    """Per-anatomy accuracy of the assignment: of the truth's sentences of anatomy A (in reports
    that were split), the share assigned A. A truth sentence the splitter did not cut out as
    such counts as wrong (`unmatched`)."""
    pred = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for s, a in json.loads(r["sentences"]):
            pred[(r["key"], _norm(s))] = a
    keys = {r["key"] for r in rows if r.get("status") == "ok"}
    total, right, unmatched = Counter(), Counter(), 0
    confusion: dict[str, Counter] = {}
    with open(truth_path) as f:
        for line in f:
            t = json.loads(line)
            if t["key"] not in keys:
                continue
            want = t["anatomy"] if t["anatomy"] in anatomies else OTHER
            got = pred.get((t["key"], _norm(t["sentence"])))
            unmatched += got is None
            total[want] += 1
            right[want] += got == want
            confusion.setdefault(want, Counter())[got or "unmatched"] += 1
    per = {a: {"accuracy": right[a] / total[a] if total[a] else None, "sentences": total[a]}
           for a in (*anatomies, OTHER)}
    n = sum(total.values())
    return {"reports": len(keys), "sentences": n, "accuracy": sum(right.values()) / n if n else None,
            "unmatched": unmatched, "per_anatomy": per, "confusion": {k: dict(v) for k, v in confusion.items()}}


def split_table(score: dict) -> str:
    lines = ["| anatomy | sentences | accuracy |", "|---|---:|---:|"]
    for a, v in score["per_anatomy"].items():
        acc = "n/a" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
        lines.append(f"| {a} | {v['sentences']} | {acc} |")
    acc = "n/a" if score["accuracy"] is None else f"{score['accuracy']:.3f}"
    lines.append(f"| all | {score['sentences']} | {acc} |")
    return "\n".join(lines)
