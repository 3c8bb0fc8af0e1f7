"""Label sets: small YAML files of finding names (+ definitions), shipped in `resources/`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

RESOURCES = Path(__file__).parent / "resources"


@dataclass(frozen=True)
class Finding:
    name: str
    definition: str = ""
    prevalence: float = 0.0  # in a reference cohort; drives the synthetic cohort
    synonyms: tuple[str, ...] = ()
    anatomy: str = ""  # the mask region it belongs to (fVLM-style sets); "global": the whole report


@dataclass(frozen=True)
class LabelSet:
    name: str
    findings: tuple[Finding, ...]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.findings]


@lru_cache(maxsize=None)
def load_label_set(name_or_path: str = "ctrate18") -> LabelSet:
    p = Path(name_or_path)
    if not p.suffix:
        p = RESOURCES / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in RESOURCES.glob("*.yaml"))
        raise FileNotFoundError(f"label set {name_or_path!r} not found; shipped sets: {known}, or give a YAML path")
    data = yaml.safe_load(p.read_text())
    fields = set(Finding.__dataclass_fields__)
    findings = []
    for f in data["findings"]:
        unknown = set(f) - fields
        if unknown:
            raise ValueError(f"{p}: finding {f.get('name')!r} has unknown field(s) {sorted(unknown)}; "
                             f"allowed: {sorted(fields)}")
        findings.append(Finding(**{**f, "synonyms": tuple(f.get("synonyms", ()))}))
    names = [f.name for f in findings]
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: duplicate finding names")
    return LabelSet(data["name"], tuple(findings))
