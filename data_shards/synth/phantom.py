"""Chest-CT phantom: anatomy with plausible HU and masks, plus the 18 CT-RATE findings.

Each finding is drawn from its own RNG stream, so toggling one finding changes only its own
voxels; that is what the visibility test relies on. Sizes never drop below about one voxel,
so every finding stays visible at coarse demo resolutions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..format import ANATOMY_LABELS
from .canvas import Canvas

LUNG, HEART, AORTA, ESO, TRACHEA, BONE = (ANATOMY_LABELS[k] for k in
                                          ("lung", "heart", "aorta", "esophagus", "trachea", "bone"))
HU = {"air": -1000, "lung": -850, "fat": -95, "muscle": 45, "blood": 150, "myocardium": 40, "liver": 60,
      "bone": 650, "marrow": 250, "water": 12, "metal": 2800, "calcium": 850}


@dataclass
class Anatomy:
    """Per-patient body geometry in mm (z, y, x); drawn once, shared by all its scans."""

    s: float  # body scale
    heart_c: np.ndarray
    heart_r: np.ndarray
    lung_r: np.ndarray
    lung_c: tuple
    details: dict = field(default_factory=dict)


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    s = float(rng.uniform(0.85, 1.1))
    heart_c = np.array([-45.0, 25.0, -18.0]) * s + rng.normal(0, 3, 3)
    heart_r = np.array([52.0, 46.0, 55.0]) * s * rng.uniform(0.93, 1.07)
    lung_r = np.array([122.0, 72.0, 52.0]) * s * rng.uniform(0.95, 1.05, 3)
    lung_c = (np.array([10.0, -5.0, 64.0]) * s, np.array([5.0, -5.0, -64.0]) * s)  # right (x+), left
    return Anatomy(s, heart_c, heart_r, lung_r, lung_c)


def _aorta_path(s):
    return [np.array(p) * s for p in ([-10, 22, 0], [60, 16, 0], [66, -34, -25], [-150, -44, -25])]


def render(cv: Canvas, a: Anatomy, findings: dict[str, bool], rngs: dict[str, np.random.Generator]) -> dict:
    """Paint anatomy then findings onto `cv`. Returns per-finding details for the report."""
    s, vs = a.s, cv.voxel
    details: dict[str, dict] = {}
    big = 1e4
    # Body: fat envelope, muscle wall, mediastinal fat cavity.
    cv.paint(cv.elliptic_cylinder(0, 0, 108 * s, 152 * s, -big, big), HU["fat"])
    cv.paint(cv.elliptic_cylinder(0, 0, 98 * s, 141 * s, -big, big), HU["muscle"])
    cv.paint(cv.elliptic_cylinder(-4 * s, 0, 86 * s, 126 * s, -big, big), HU["fat"])
    cv.paint(cv.ellipsoid(np.array([-175, 10, 40]) * s, np.array([75, 90, 110]) * s), HU["liver"])
    # Lungs.
    for c in a.lung_c:
        cv.paint(cv.ellipsoid(c, a.lung_r * (1.0 if c[2] > 0 else 0.95)), HU["lung"], label=LUNG)
    rv = rngs["anatomy"]
    for side in (1, -1):  # a few vessels radiating from each hilum
        hil = np.array([15, 0, 30 * side]) * s
        for _ in range(6):
            d = rv.normal(0, 1, 3) * np.array([1.0, 0.6, 0.6]) + np.array([0, 0, 0.8 * side])
            end = hil + d / np.linalg.norm(d) * rv.uniform(50, 90) * s
            cv.paint(cv.capsule(hil, end, max(2.0, 0.5 * vs)), HU["muscle"], within=(LUNG,))
    # Normal bronchi (thin walls); peribronchial thickening / bronchiectasis re-draw some later.
    bronchi = []
    for side in (1, -1):
        hil = np.array([25, 0, 32 * side]) * s
        for _ in range(3):
            d = rv.normal(0, 1, 3) * np.array([1.0, 0.5, 0.4]) + np.array([-0.6, 0, 0.7 * side])
            end = hil + d / np.linalg.norm(d) * rv.uniform(45, 70) * s
            bronchi.append((hil, end))
            cv.paint(cv.capsule(hil, end, 4.0), HU["fat"] - 100, within=(LUNG,))
            cv.paint(cv.capsule(hil, end, 3.0), HU["air"], within=(LUNG,))
    # Pericardial effusion sits between the heart and the lung, so paint it before the heart.
    heart_r = a.heart_r * (1.33 if findings.get("Cardiomegaly") else 1.0)
    if findings.get("Pericardial effusion"):
        r = rngs["Pericardial effusion"]
        thick = max(float(r.uniform(8, 16)), 1.5 * vs)
        cv.paint(cv.ellipsoid(a.heart_c, heart_r + thick), HU["water"], clear_label=0)
        details["Pericardial effusion"] = {"size_mm": round(thick)}
    cv.paint(cv.ellipsoid(a.heart_c, heart_r), HU["myocardium"], label=HEART)
    cv.paint(cv.ellipsoid(a.heart_c, heart_r * 0.72), HU["blood"], label=HEART)
    if findings.get("Cardiomegaly"):
        details["Cardiomegaly"] = {"ratio": round(0.5 + float(rngs["Cardiomegaly"].uniform(0.04, 0.12)), 2)}
    # Aorta: ascending, arch, descending.
    path = _aorta_path(s)
    ar = [14 * s, 13 * s, 12 * s]
    for (p0, p1), r in zip(zip(path[:-1], path[1:]), ar):
        cv.paint(cv.capsule(p0, p1, r), HU["blood"], label=AORTA)
    # Oesophagus, trachea and main bronchi.
    e0, e1 = np.array([170, -50, 6]) * s, np.array([-140, -42, -12]) * s
    cv.paint(cv.capsule(e0, e1, 7 * s), HU["muscle"] - 10, label=ESO)
    t0, carina = np.array([200, 4, 0]) * s, np.array([40, 0, 0]) * s
    cv.paint(cv.capsule(t0, carina, 10 * s), HU["muscle"], label=TRACHEA)
    cv.paint(cv.capsule(t0, carina, 8 * s), HU["air"], label=TRACHEA)
    for side in (1, -1):
        cv.paint(cv.capsule(carina, np.array([22, -2, 34 * side]) * s, 6 * s), HU["air"], label=TRACHEA)
    # Bones: vertebral bodies, sternum, ribs.
    cv.paint(cv.elliptic_cylinder(-80 * s, 0, 17 * s, 17 * s, -big, big), HU["bone"], label=BONE)
    cv.paint(cv.elliptic_cylinder(-80 * s, 0, 13 * s, 13 * s, -big, big), HU["marrow"], label=BONE)
    cv.paint(cv.elliptic_cylinder(88 * s, 0, 6 * s, 16 * s, -70 * s, 130 * s), HU["bone"], label=BONE)
    for zr in np.arange(-130, 170, 30) * s:
        sl = cv.elliptic_cylinder(-4 * s, 0, 96 * s, 138 * s, zr - max(5.0, vs / 2), zr + max(5.0, vs / 2))
        inner = cv.elliptic_cylinder(-4 * s, 0, 88 * s, 128 * s, zr - max(5.0, vs / 2), zr + max(5.0, vs / 2))
        if sl is not None and inner is not None:
            ring = (sl[0], sl[1] & ~_expand(inner, sl))
            cv.paint(ring, HU["bone"], label=BONE)
    _render_findings(cv, a, findings, rngs, bronchi, details)
    return details


def _expand(inner, outer_region):
    """Place `inner`'s mask into `outer_region`'s box (inner lies within it)."""
    isl, im = inner
    osl, om = outer_region
    out = np.zeros(om.shape, dtype=bool)
    out[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(isl, osl))] = im
    return out


def _lung_points(cv, r, n, where=None):
    return [p for p in (cv.random_point(r, LUNG, where) for _ in range(n)) if p is not None]


def _side(p) -> str:
    return "right" if p[2] > 0 else "left"


def _render_findings(cv: Canvas, a: Anatomy, f: dict, rngs, bronchi, details) -> None:
    s, vs = a.s, cv.voxel
    lo = min(c[0] - a.lung_r[0] for c in a.lung_c)  # lung base z
    hi = max(c[0] + a.lung_r[0] for c in a.lung_c)

    if f.get("Medical material"):
        r = rngs["Medical material"]
        kind = r.choice(["catheter", "wires", "stent"])
        if kind == "catheter":
            p0 = np.array([150, 45, r.choice([1, -1]) * 60]) * s
            p1 = a.heart_c + np.array([a.heart_r[0] * 0.5, 0, a.heart_r[2] * 0.4])
            cv.paint(cv.capsule(p0, p1, max(1.5, 0.6 * vs)), HU["metal"])
        elif kind == "wires":
            for z in np.linspace(-40, 100, 4) * s:
                cv.paint(cv.capsule(np.array([z, 84, -12]) * s, np.array([z, 84, 12]) * s, max(1.2, 0.6 * vs)), HU["metal"])
        else:
            p = _aorta_path(s)
            cv.paint(cv.capsule(p[2] + (p[3] - p[2]) * 0.2, p[2] + (p[3] - p[2]) * 0.4, 12 * s), HU["metal"] - 1000,
                     within=(AORTA,))
        details["Medical material"] = {"kind": str(kind)}

    if f.get("Arterial wall calcification"):
        r = rngs["Arterial wall calcification"]
        path, rad = _aorta_path(s), [14 * s, 13 * s, 12 * s]
        for _ in range(int(r.integers(3, 8))):
            k = int(r.integers(3))
            c = path[k] + (path[k + 1] - path[k]) * r.uniform(0.1, 0.9)
            d = r.normal(0, 1, 3); d[0] = 0
            cv.paint(cv.ellipsoid(c + d / np.linalg.norm(d) * rad[k], [max(2.5, 0.8 * vs)] * 3), HU["calcium"])
        details["Arterial wall calcification"] = {}

    if f.get("Coronary artery wall calcification"):
        r = rngs["Coronary artery wall calcification"]
        hr = a.heart_r * (1.33 if f.get("Cardiomegaly") else 1.0)
        for _ in range(int(r.integers(2, 6))):
            d = np.abs(r.normal(0, 1, 3)) * np.array([1, 1, r.choice([1, -1])])
            d /= np.linalg.norm(d)
            cv.paint(cv.ellipsoid(a.heart_c + d * hr * 0.98, [max(2.0, 0.8 * vs)] * 3), HU["calcium"] - 100)
        details["Coronary artery wall calcification"] = {}

    if f.get("Hiatal hernia"):
        r = rngs["Hiatal hernia"]
        c = np.array([-125, -38, -8]) * s + r.normal(0, 3, 3)
        rad = np.array([30, 24, 28]) * s * r.uniform(0.8, 1.2)
        cv.paint(cv.ellipsoid(c, rad + 3), HU["muscle"])
        cv.paint(cv.ellipsoid(c, rad), HU["water"] + 10)
        cv.paint(cv.ellipsoid(c + np.array([rad[0] * 0.5, 0, 0]), rad * np.array([0.45, 0.8, 0.8])), HU["air"] + 100)
        details["Hiatal hernia"] = {}

    if f.get("Lymphadenopathy"):
        r = rngs["Lymphadenopathy"]
        stations = {"right paratracheal": [70, 8, 14], "left paratracheal": [70, 8, -14], "subcarinal": [25, -14, 0],
                    "prevascular": [50, 45, 0], "right hilar": [15, 0, 38], "left hilar": [15, 0, -38]}
        names = list(stations)
        chosen = r.choice(len(names), size=int(r.integers(2, 4)), replace=False)
        big_mm = []
        for k in chosen:
            rad = float(r.uniform(9, 14))
            big_mm.append(round(2 * rad))
            cv.paint(cv.ellipsoid(np.array(stations[names[k]]) * s, [max(rad, 1.2 * vs)] * 3), HU["muscle"],
                     within=(0, LUNG))
        details["Lymphadenopathy"] = {"stations": [names[k] for k in chosen], "size_mm": max(big_mm)}

    if f.get("Emphysema"):
        r = rngs["Emphysema"]
        for p in _lung_points(cv, r, int(r.integers(5, 11)), where=lambda z, y, x: z > (lo + hi) / 2):
            cv.paint(cv.ellipsoid(p, [max(float(r.uniform(8, 18)), 1.5 * vs)] * 3), -990, within=(LUNG,))
        details["Emphysema"] = {"zone": "upper lobes"}

    if f.get("Lung opacity"):
        r = rngs["Lung opacity"]
        pts = _lung_points(cv, r, int(r.integers(1, 4)))
        for p in pts:
            cv.paint(cv.ellipsoid(p, [max(float(r.uniform(15, 30)), 2 * vs)] * 3), add=300, within=(LUNG,))
        details["Lung opacity"] = {"side": _sides(pts)}

    if f.get("Mosaic attenuation pattern"):
        r = rngs["Mosaic attenuation pattern"]
        lam = max(18.0, 3 * vs)
        z, y, x = cv.axes[0][:, None, None], cv.axes[1][None, :, None], cv.axes[2][None, None, :]
        ph = r.uniform(0, 2 * np.pi, 3)
        patt = np.sign(np.sin(z / lam + ph[0]) * np.sin(y / lam + ph[1]) * np.sin(x / lam + ph[2])).astype(np.float32)
        m = cv.label == LUNG
        cv.hu[m] += 90 * patt[m]
        details["Mosaic attenuation pattern"] = {}

    if f.get("Interlobular septal thickening"):
        r = rngs["Interlobular septal thickening"]
        L, t = max(12.0, 3 * vs), max(1.5, 0.6 * vs)
        off = r.uniform(0, L, 3)
        z, y, x = cv.axes[0][:, None, None], cv.axes[1][None, :, None], cv.axes[2][None, None, :]
        near = lambda v, o: np.abs(((v + o) % L) - L / 2) > (L / 2 - t / 2)  # noqa: E731
        net = near(z, off[0]) | near(y, off[1]) | near(x, off[2])
        periph = np.zeros(cv.shape, dtype=bool)
        for c in a.lung_c:
            q = ((z - c[0]) / a.lung_r[0]) ** 2 + ((y - c[1]) / a.lung_r[1]) ** 2 + ((x - c[2]) / a.lung_r[2]) ** 2
            periph |= q > 0.45
        m = (cv.label == LUNG) & net & periph
        cv.hu[m] = -300
        details["Interlobular septal thickening"] = {}

    if f.get("Pulmonary fibrotic sequela"):
        r = rngs["Pulmonary fibrotic sequela"]
        pts = _lung_points(cv, r, int(r.integers(3, 7)), where=lambda z, y, x: z > hi - 0.45 * (hi - lo))
        for p in pts:
            d = r.normal(0, 1, 3); d /= np.linalg.norm(d)
            cv.paint(cv.capsule(p, p + d * r.uniform(25, 45), max(1.5, 0.6 * vs)), -80, within=(LUNG,))
        details["Pulmonary fibrotic sequela"] = {"side": _sides(pts), "zone": "apical"}

    if f.get("Peribronchial thickening") or f.get("Bronchiectasis"):
        for name, wall, lumen in (("Peribronchial thickening", 4.5, 3.0), ("Bronchiectasis", 3.0, 8.0)):
            if not f.get(name):
                continue
            r = rngs[name]
            picks = r.choice(len(bronchi), size=int(r.integers(3, len(bronchi) + 1)), replace=False)
            for k in picks:
                p0, p1 = bronchi[k]
                lum = max(lumen * r.uniform(0.9, 1.2), 0.8 * vs) if name == "Bronchiectasis" else lumen
                w = max(wall, 1.0 * vs)
                cv.paint(cv.capsule(p0, p1, lum + w), HU["muscle"] - 20, within=(LUNG,))
                cv.paint(cv.capsule(p0, p1, lum), HU["air"], within=(LUNG,))
            details[name] = {"side": _sides([bronchi[k][1] for k in picks])}

    if f.get("Lung nodule"):
        r = rngs["Lung nodule"]
        pts = _lung_points(cv, r, int(r.integers(1, 5)))
        sizes = []
        for p in pts:
            rad = max(float(r.uniform(2.5, 8)), 0.9 * vs)
            sizes.append(round(2 * rad, 1))
            cv.paint(cv.ellipsoid(p, [rad] * 3), HU["muscle"], within=(LUNG,))
        details["Lung nodule"] = {"side": _sides(pts), "sizes_mm": sizes}

    if f.get("Consolidation"):
        r = rngs["Consolidation"]
        pts = _lung_points(cv, r, int(r.integers(1, 3)), where=lambda z, y, x: z < (lo + hi) / 2)
        for p in pts:
            cv.paint(cv.ellipsoid(p, np.array([30, 25, 25]) * r.uniform(0.8, 1.4)), 30, within=(LUNG,))
        details["Consolidation"] = {"side": _sides(pts), "zone": "lower lobe"}

    if f.get("Atelectasis"):
        r = rngs["Atelectasis"]
        pts = _lung_points(cv, r, int(r.integers(1, 3)),
                           where=lambda z, y, x: (z < lo + 0.35 * (hi - lo)) & (y < -25 * s))
        for p in pts:
            cv.paint(cv.ellipsoid(p, [max(12.0, 1.5 * vs), max(5.0, 1.2 * vs), 28.0]), 5, within=(LUNG,))
        details["Atelectasis"] = {"side": _sides(pts)}

    if f.get("Pleural effusion"):  # dependent fluid layered at the lung base
        r = rngs["Pleural effusion"]
        sides = {"right": [0], "left": [1], "bilateral": [0, 1]}[str(r.choice(["right", "left", "bilateral"]))]
        h = max(float(r.uniform(25, 50)), 2 * vs)
        z, y, x = cv.axes[0][:, None, None], cv.axes[1][None, :, None], cv.axes[2][None, None, :]
        for k in sides:
            c = a.lung_c[k]
            base = c[0] - a.lung_r[0]
            side_mask = (x > 0) if k == 0 else (x < 0)
            m = (cv.label == LUNG) & (z < base + h) & side_mask & (y < c[1] + 0.4 * a.lung_r[1])
            cv.hu[m] = HU["water"]
            cv.label[m] = 0
            cv._points.clear()
        details["Pleural effusion"] = {"side": ["right", "left", "bilateral"][0 if sides == [0] else 1 if sides == [1] else 2],
                                       "size_mm": round(h)}


def _sides(points) -> str:
    s = {_side(p) for p in points}
    return "both" if len(s) > 1 else (s.pop() if s else "right")
