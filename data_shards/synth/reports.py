"""CT-RATE-style reports: findings then impression; present findings described in varied
words (with the rendered side and size), absent ones often negated, sometimes not mentioned.
Each report comes with its sentence truth: every sentence with its finding (or none), whether it
states the finding present or absent, and its anatomy, so that a report split can be scored.
"""
from __future__ import annotations

import numpy as np

LOBES = {"right": ["right upper lobe", "right middle lobe", "right lower lobe"],
         "left": ["left upper lobe", "lingula", "left lower lobe"], "both": ["lower lobes of both lungs", "upper lobes of both lungs"]}

POS = {
    "Medical material": {
        "catheter": ["A central venous catheter is observed, its tip in the right atrium.",
                     "Port catheter is seen extending to the cavoatrial junction."],
        "wires": ["Sternotomy wires are observed.", "Median sternotomy with sternal wires is noted."],
        "stent": ["An endovascular stent graft is observed in the descending aorta.",
                  "Stent material is present in the descending thoracic aorta."],
    },
    "Arterial wall calcification": ["Atherosclerotic calcifications are observed in the wall of the thoracic aorta.",
                                    "Calcific plaques are observed in the aortic arch and descending aorta.",
                                    "Millimetric calcific atheroma plaques are seen in the aortic wall."],
    "Cardiomegaly": ["The heart is enlarged (cardiothoracic ratio about {ratio}).", "Cardiomegaly is present.",
                     "Heart size is increased."],
    "Pericardial effusion": ["Pericardial effusion reaching {size_mm} mm in thickness is observed.",
                             "Pericardial effusion-thickening of {size_mm} mm is noted."],
    "Coronary artery wall calcification": ["Calcific atheroma plaques are observed in the coronary arteries.",
                                           "Coronary artery calcifications are seen along the LAD and circumflex arteries."],
    "Hiatal hernia": ["A hiatal hernia is observed.", "Sliding type hiatal hernia is seen at the esophagogastric junction."],
    "Lymphadenopathy": ["Lymph nodes of pathological size are observed in the {stations}, the largest {size_mm} mm in short axis.",
                        "There are multiple LAPs in the {stations} stations, the largest {size_mm} mm."],
    "Emphysema": ["Centriacinar emphysematous changes are observed in the {zone}.",
                  "Emphysema is noted in both lungs, more prominent in the {zone}."],
    "Atelectasis": ["Subsegmental atelectasis is observed in the {lobe}.",
                    "Linear atelectatic changes are seen in the posterobasal segment of the {lobe}."],
    "Lung nodule": ["A {size} mm nodule is observed in the {lobe}.",
                    "Nonspecific nodules up to {size} mm in diameter are seen in the {lobe}."],
    "Lung opacity": ["Ground-glass opacities are observed in the {lobe}.",
                     "There are patchy areas of ground glass density in the {lobe}."],
    "Pulmonary fibrotic sequela": ["Pleuroparenchymal sequelae density increases are observed in the lung apex.",
                                   "Fibrotic bands are seen in the {lobe}."],
    "Pleural effusion": ["Pleural effusion reaching {size_mm} mm in thickness is observed in the {side} hemithorax.",
                         "{Side} pleural effusion is present."],
    "Mosaic attenuation pattern": ["Mosaic attenuation pattern is observed in both lungs.",
                                   "Heterogeneous parenchymal density compatible with mosaic perfusion is noted."],
    "Peribronchial thickening": ["Peribronchial thickening is observed in the {lobe}.",
                                 "Bronchial wall thickening is noted."],
    "Consolidation": ["Consolidation areas are observed in the {lobe}.",
                      "A consolidated area with air bronchograms is seen in the {lobe}."],
    "Bronchiectasis": ["Cylindrical bronchiectasis is observed in the {lobe}.",
                       "Bronchiectatic changes are seen in the {lobe}."],
    "Interlobular septal thickening": ["Interlobular septal thickening is observed in the peripheral lung zones.",
                                       "Thickening of the interlobular septa is noted."],
}

NEG = {
    "Medical material": [],
    "Arterial wall calcification": ["Thoracic aorta diameter is normal and no wall calcification was observed."],
    "Cardiomegaly": ["Heart contour, size are normal.", "Heart size is normal."],
    "Pericardial effusion": ["Pericardial effusion-thickening was not observed.", "No pericardial effusion was observed."],
    "Coronary artery wall calcification": ["No calcification was observed in the coronary arteries."],
    "Hiatal hernia": ["No hiatal hernia was detected.", "Thoracic esophagus calibration was normal."],
    "Lymphadenopathy": ["No enlarged lymph nodes were detected in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary pathological dimensions.",
                        "No pathological LAP was detected in the mediastinum."],
    "Emphysema": ["No emphysema was detected.", "Aeration of both lung parenchyma is normal."],
    "Atelectasis": ["No atelectasis was observed."],
    "Lung nodule": ["No nodular lesion was detected in the lung parenchyma.", "No mass or nodule was detected in both lungs."],
    "Lung opacity": ["No infiltrative lesion was detected in the lung parenchyma."],
    "Pulmonary fibrotic sequela": ["No fibrotic change was observed."],
    "Pleural effusion": ["No pleural effusion was observed.", "Pleural effusion-thickening was not detected."],
    "Mosaic attenuation pattern": [],
    "Peribronchial thickening": ["No bronchial wall thickening was observed."],
    "Consolidation": ["No consolidation was detected.", "No active infiltration was observed."],
    "Bronchiectasis": ["No bronchiectasis was observed."],
    "Interlobular septal thickening": [],
}

IMPRESSION = {
    "Medical material": "Medical device in place", "Arterial wall calcification": "Aortic atherosclerosis",
    "Cardiomegaly": "Cardiomegaly", "Pericardial effusion": "Pericardial effusion",
    "Coronary artery wall calcification": "Coronary artery calcification", "Hiatal hernia": "Hiatal hernia",
    "Lymphadenopathy": "Mediastinal lymphadenopathy", "Emphysema": "Emphysema", "Atelectasis": "Atelectasis",
    "Lung nodule": "Pulmonary nodule(s)", "Lung opacity": "Ground-glass opacities",
    "Pulmonary fibrotic sequela": "Fibrotic sequelae", "Pleural effusion": "Pleural effusion",
    "Mosaic attenuation pattern": "Mosaic attenuation", "Peribronchial thickening": "Peribronchial thickening",
    "Consolidation": "Consolidation (infection?)", "Bronchiectasis": "Bronchiectasis",
    "Interlobular septal thickening": "Interlobular septal thickening",
}

# Report order: airway/mediastinum first, then lung window, then pleura, as CT-RATE reports do.
ORDER = ["Medical material", "Cardiomegaly", "Arterial wall calcification", "Coronary artery wall calcification",
         "Pericardial effusion", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Mosaic attenuation pattern",
         "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Pulmonary fibrotic sequela",
         "Peribronchial thickening", "Bronchiectasis", "Interlobular septal thickening", "Pleural effusion"]


def _fill(template: str, d: dict, rng) -> str:
    side = d.get("side", "right")
    lobe = str(rng.choice(LOBES.get(side, LOBES["both"])))
    sizes = d.get("sizes_mm") or [d.get("size_mm", 5)]
    stations = d.get("stations", ["subcarinal"])
    return template.format(lobe=lobe, side=side if side != "both" else "bilateral", Side=side.capitalize() if side != "both" else "Bilateral",
                           size=max(sizes), size_mm=d.get("size_mm", max(sizes)), ratio=d.get("ratio", 0.55),
                           zone=d.get("zone", "upper lobes"), stations=" and ".join(stations))


def _truth(sentence: str, section: str, finding=None, stated=None, anatomy=None) -> dict:
    return {"section": section, "sentence": sentence, "finding": finding, "stated": stated, "anatomy": anatomy}


def write_report(labels: dict[str, bool], details: dict, rng: np.random.Generator, p_negate: float = 0.7,
                 anatomy_of: dict[str, str] | None = None) -> tuple[str, list[dict]]:
    """-> (report text, sentence truth). A finding's anatomy comes from `anatomy_of` (the label
    set's); "global" findings and sentences about no finding are `other`, except the lung-window
    header, which is the lung's."""
    anatomy_of = anatomy_of or {}
    organ = lambda n: anatomy_of.get(n) if anatomy_of.get(n) not in (None, "", "global") else "other"  # noqa: E731
    sents = [_truth("Trachea and both main bronchi are open.", "findings", anatomy="other")]
    for name in ORDER:
        if name == "Emphysema":
            sents.append(_truth("When examined in the lung parenchyma window;", "findings", anatomy="lung"))
        if labels.get(name):
            opts = POS[name]
            if isinstance(opts, dict):
                opts = opts[details.get(name, {}).get("kind", next(iter(opts)))]
            text = _fill(str(rng.choice(opts)), details.get(name, {}), rng)
            sents.append(_truth(text, "findings", name, "present", organ(name)))
        elif NEG[name] and rng.random() < p_negate:
            sents.append(_truth(str(rng.choice(NEG[name])), "findings", name, "absent", organ(name)))
    sents.append(_truth(str(rng.choice(["Upper abdominal organs included in the sections are normal.",
                                        "No space-occupying lesion was detected in the liver that entered the "
                                        "cross-sectional area."])), "findings", anatomy="other"))
    sents.append(_truth(str(rng.choice(["Bone structures in the study area are natural.",
                                        "Vertebral corpus heights are preserved."])), "findings", anatomy="other"))
    present = [n for n in ORDER if labels.get(n)]
    if present:
        imp = [_truth(f"{IMPRESSION[n]}.", "impression", n, "present", organ(n)) for n in present]
        imp_text = " ".join(f"• {t['sentence']}" for t in imp)
    else:
        imp = [_truth(str(rng.choice(["Thoracic CT examination within normal limits.", "No significant pathology."])),
                      "impression", anatomy="other")]
        imp_text = imp[0]["sentence"]
    report = "Findings: " + " ".join(t["sentence"] for t in sents) + "\nImpression: " + imp_text
    return report, sents + imp
