"""Rule-based labeler of the classical kind (CheXpert labeler / NegEx style).

Report -> sections (findings, impression) -> sentences -> clauses. In each clause a finding
is *mentioned* when one of its patterns matches (and its context terms, and none of its
exclusions). A mention is *negated* when a negation cue stands before it in the clause
("no", "without", "free of") or after it ("was not observed", "not detected", "is normal"),
and *uncertain* when hedged ("?", "suspicious for", "possible", "cannot be excluded").

Per finding: probability = max over mentions of {positive 0.95, hedged-small 0.85,
uncertain 0.6, negated 0.03}, or 0.10 when never mentioned; hard label 1 / -1 / 0.
The CT-RATE patterns were tuned on the 800 dev reports only. For any other label set the
finding names and YAML synonyms become the patterns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from data_shards.label_sets import LabelSet

P_POS, P_WEAK, P_UNCERTAIN, P_NEG, P_ABSENT = 0.95, 0.85, 0.6, 0.03, 0.10

PRE_NEG = re.compile(r"\b(no|not|without|absence of|absent|free of|negative for|neither|nor|rule[sd]? out|"
                     r"ruled out|resolved|regressed|disappeared)\b", re.I)
POST_NEG = re.compile(r"\b(not|n't|no)\b[\w\s,-]{0,40}?\b(observed|detected|seen|present|identified|noted|found|"
                      r"visualized|monitored|evident|distinguished|encountered)\b|\b(is|are|was|were|appears?)\s+(within\s+)?(normal|natural)\b|"
                      r"\bnormal\s+limits\b|\bwere\s+not\b|\bwas\s+not\b|\bnone\b", re.I)
UNCERTAIN = re.compile(r"\?|\b(suspicious|suspected|possibl[ey]|probabl[ey]|likely|may\s+be|might|"
                       r"cannot\s+be\s+excluded|could\s+not\s+be\s+excluded|not\s+excluded|questionable|equivocal|"
                       r"to\s+be\s+differentiated|differential|suggestive|doubtful|rule\s+out)\b", re.I)
WEAK = re.compile(r"\b(minimal|millimetric|mild|slight|small|tiny|subtle|few)\b", re.I)
SENT_SPLIT = re.compile(r"(?<=[.!])\s+(?=[A-Z0-9•\"])|\n+|•|\"|(?<=\.)\"|;\s*(?=[A-Za-z])")
CLAUSE_SPLIT = re.compile(r";|,\s*(?:but|however|whereas|while)\b|\bhowever\b|\bbut\b|\bapart from\b|"
                          r"\bexcept\b|\bother than\b|\bin addition\b|\balso\b", re.I)


@dataclass
class Rule:
    patterns: list[str]
    context: list[str] = field(default_factory=list)  # one of these must also occur in the clause
    exclude: list[str] = field(default_factory=list)  # a clause with one of these is not about this finding
    negative: list[str] = field(default_factory=list)  # phrases that state the finding's absence
    weak_is_negative: bool = False  # "minimal X" counts as absent for this finding
    not_negation: list[str] = field(default_factory=list)  # negative-looking phrases that still describe X

    def compile(self):
        c = lambda xs: re.compile("|".join(f"(?:{x})" for x in xs), re.I) if xs else None  # noqa: E731
        return c(self.patterns), c(self.context), c(self.exclude), c(self.negative)


CTRATE_RULES: dict[str, Rule] = {
    "Medical material": Rule(
        [r"catheter", r"\bport\b", r"\bstent", r"pacemaker", r"prosthe", r"sternotomy", r"sternal (?:wire|suture)",
         r"suture material", r"(?:surgical|metallic|vascular) clip", r"\bclips?\b", r"valve replacement",
         r"(?:mechanical|prosthetic) valve", r"\bdrain", r"\btube\b", r"defibrillator", r"\bICD\b", r"\bgraft",
         r"\bcoils?\b", r"embolization material", r"screw", r"osteosynthesis", r"\bwires?\b", r"cerclage",
         r"metallic (?:density|material|artifact)", r"foreign body", r"\belectrode",
         r"pacing", r"\bcannula", r"tracheostomy", r"implant", r"\bplate\b", r"\bPEG\b", r"sutur"],
        exclude=[r"contrast material", r"contrast agent", r"bronch\w* tube", r"tubular", r"tube current",
                 r"breast implant", r"implant[\w\s]{0,20}breast", r"omental implant", r"choledoch"]),
    "Arterial wall calcification": Rule(
        [r"calcif", r"atherom", r"atheroscl", r"plaque"],
        context=[r"aort", r"arter", r"vascular", r"vessel", r"carotid", r"subclavian", r"brachiocephalic",
                 r"truncus", r"\barch\b", r"celiac", r"mesenteric"],
        exclude=[r"^(?!.*(?:aort|carotid|subclavian|brachiocephalic|\barch\b|vascular|truncus|pulmonary arter)).*coronar",
                 r"abdominal aort", r"valv", r"lymph", r"nodul", r"granulom", r"pleura", r"costal", r"cartilag"]),
    "Cardiomegaly": Rule(
        [r"cardiomegal", r"(?:heart|cardiac)\b[\w\s,]{0,25}(?:enlarg|increas)", r"enlarg\w* (?:heart|cardiac)",
         r"cardiothoracic (?:ratio|index)[\w\s]{0,15}increas", r"increased cardiothoracic", r"\bCTR\b[\w\s]{0,10}increas",
         r"heart is larger", r"larger than normal[\w\s]{0,10}heart", r"increase in favor of the heart"],
        negative=[r"(?:heart|cardiac)[\w\s,]{0,30}(?:size|sizes|dimensions?|contour)[\w\s,]{0,15}(?:normal|natural)"]),
    "Pericardial effusion": Rule(
        [r"pericard\w*[\w\s-]{0,15}(?:effusion|fluid|thicken)", r"effusion[\w\s-]{0,20}pericard"]),
    "Coronary artery wall calcification": Rule(
        [r"calcif", r"atherom", r"plaque"], context=[r"coronar", r"\bLAD\b", r"circumflex", r"\bRCA\b", r"\bLCX\b"]),
    "Hiatal hernia": Rule([r"hiatal", r"hiatus", r"hernia"],
                          exclude=[r"inguinal", r"umbilical", r"incisional", r"diaphragmatic hernia", r"hernia sac",
                                   r"abdominal wall", r"bochdalek", r"morgagni"]),
    # CT-RATE's hand labels count any described lymph node, pathological size or not.
    "Lymphadenopathy": Rule(
        [r"lymphadenopath", r"\bLAPs?\b", r"lymph\s*nod", r"adenopath"],
        exclude=[r"intrapulmonary lymph", r"intra-?abdominal", r"inguinal", r"iliac", r"paraaort", r"interaortocaval"],
        not_negation=[r"(?:did|do|does)\s+not\s+reach[\w\s-]{0,30}(?:patholog|size|dimension|criteria)",
                      r"not\s+(?:observed\s+)?(?:in|of|at|with)\s+(?:a\s+)?patholog\w*\s+(?:size|dimension)[\w\s-]*",
                      r"non-?patholog\w*", r"not\s+patholog\w*", r"below\s+patholog\w*"]),
    "Emphysema": Rule([r"emphysem", r"\bbullae?\b", r"bullous", r"\bblebs?\b"]),
    "Atelectasis": Rule([r"atelecta", r"collaps"]),
    "Lung nodule": Rule(
        [r"nodul", r"nodule", r"\bmass\b", r"\bmasses\b", r"space-occupying"],
        exclude=[r"thyroid", r"adrenal", r"liver", r"hepat", r"kidney", r"renal", r"breast",
                 r"spleen", r"pancrea", r"\bbone", r"mediastin\w* mass", r"nodular (?:thicken|ground|densit|opacit|consol)"]),
    "Lung opacity": Rule(
        [r"ground[- ]?glass", r"opacit", r"infiltrat", r"density increase", r"increased density", r"densities",
         r"consolidat", r"\bdensity\b", r"\bdensities\b", r"hazy", r"tree[- ]in[- ]bud", r"bud tree"],
        context=[r"lung", r"lobe", r"parenchym", r"segment", r"pulmonary", r"subpleural", r"peribronch", r"bilateral",
                 r"apex", r"apical", r"basal", r"ground", r"infiltrat", r"opacit", r"consolidat", r"hemithorax", r"lingula"],
        exclude=[r"bone", r"vertebra", r"liver", r"hepat", r"sclero", r"fat density", r"fluid density", r"sequel",
                 r"fibrot", r"atelecta", r"nodul", r"calcific density", r"soft tissue density", r"metal"]),
    "Pulmonary fibrotic sequela": Rule(
        [r"fibrot", r"fibrosis", r"sequela", r"\bscar", r"fibroatelecta", r"parenchymal band", r"\bbands?\b",
         r"reticul", r"honeycomb", r"traction", r"retraction"]),
    "Pleural effusion": Rule(
        [r"pleural[\w\s-]{0,10}effusion", r"effusion[\w\s-]{0,40}(?:hemithora|pleura|sinus|costophrenic)",
         r"pleural fluid", r"(?:fluid|effusion) in (?:the )?(?:right|left|both|bilateral)", r"\beffusion\b"],
        exclude=[r"pericard", r"joint"]),
    "Mosaic attenuation pattern": Rule([r"mosaic"]),
    "Peribronchial thickening": Rule(
        [r"peribronch\w*[\w\s-]{0,25}(?:thicken|cuff|interstit|infiltrat|densit)", r"bronch\w* wall\w*[\w\s-]{0,15}thicken",
         r"thicken\w*[\w\s-]{0,25}bronch\w* wall", r"peribronchial thickening"]),
    "Consolidation": Rule([r"consolidat", r"air bronchogram"]),
    "Bronchiectasis": Rule([r"bronchiectas", r"bronchiectatic", r"bronchial dilat", r"dilat\w*[\w\s-]{0,10}bronch"]),
    "Interlobular septal thickening": Rule(
        [r"septal[\w\s-]{0,10}thicken", r"interlobular sept", r"thicken\w*[\w\s-]{0,25}septa", r"interstitial thicken",
         r"crazy[- ]paving", r"septal line"]),
}


def _default_rule(f) -> Rule:
    terms = [f.name, *f.synonyms]
    return Rule([r"\b" + re.escape(t) for t in terms])


@dataclass
class Mention:
    finding: str
    sentence: str
    state: str  # positive | weak | uncertain | negated


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\b(Findings|Impressions?|IMPRESSION|FINDINGS)\s*:\s*", "\n", text)
    return [s.strip(" .") for s in SENT_SPLIT.split(text) if s and s.strip(" .")]


class RulesLabeler:
    name = "rules"

    def __init__(self, label_set: LabelSet):
        self.label_set = label_set
        self.rules = {f.name: (CTRATE_RULES.get(f.name) if label_set.name == "ctrate18" else None) or _default_rule(f)
                      for f in label_set.findings}
        self._compiled = {n: r.compile() for n, r in self.rules.items()}

    def mentions(self, text: str) -> list[Mention]:
        out = []
        for sent in split_sentences(text):
            for clause in [c for c in CLAUSE_SPLIT.split(sent) if c and c.strip()]:
                for name, (pat, ctx, exc, neg) in self._compiled.items():
                    m = pat.search(clause)
                    if not m or (ctx and not ctx.search(clause)) or (exc and exc.search(clause)):
                        continue
                    out.append(Mention(name, clause.strip(), self._state(clause, m, neg, self.rules[name])))
        return out

    @staticmethod
    def _state(clause: str, m: re.Match, neg, rule: Rule) -> str:
        before, after = clause[: m.start()], clause[m.end():]
        for x in rule.not_negation:
            before, after = re.sub(x, " ", before, flags=re.I), re.sub(x, " ", after, flags=re.I)
        if (neg and neg.search(clause)) or PRE_NEG.search(before) or POST_NEG.search(after):
            return "negated"
        if UNCERTAIN.search(clause):
            return "uncertain"
        if WEAK.search(clause):
            return "negated" if rule.weak_is_negative else "weak"
        return "positive"

    def assess(self, text: str) -> tuple[dict[str, float], dict[str, int], list[Mention]]:
        """-> (probability per finding, hard label per finding, the mentions they came from)."""
        score = {"positive": P_POS, "weak": P_WEAK, "uncertain": P_UNCERTAIN, "negated": P_NEG}
        prob = {n: P_ABSENT for n in self.rules}
        found = self.mentions(text)
        for mn in found:
            p = score[mn.state]
            # a negation ranks below "never mentioned"; any affirmative mention wins over both
            prob[mn.finding] = p if prob[mn.finding] == P_ABSENT else max(prob[mn.finding], p)
        hard = {n: 1 if p >= P_WEAK else (-1 if p == P_UNCERTAIN else 0) for n, p in prob.items()}
        return prob, hard, found

    def label(self, text: str) -> tuple[dict[str, float], dict[str, int]]:
        prob, hard, _ = self.assess(text)
        return prob, hard
