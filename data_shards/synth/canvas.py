"""A voxel canvas in physical RAS millimetres, with shapes painted inside their bounding boxes.

Coordinates: z (S+), y (A+), x (R+), centred on the volume. Painting only touches each
primitive's bounding box, so a 120x240x240 phantom with ~60 primitives takes about a second.
"""
from __future__ import annotations

import numpy as np


class Canvas:
    def __init__(self, shape, spacing, fill: float = -1000.0):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=float)
        self.hu = np.full(self.shape, fill, dtype=np.float32)
        self.label = np.zeros(self.shape, dtype=np.uint8)
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]
        self.voxel = float(self.spacing.max())
        self._points: dict = {}

    # -- geometry -------------------------------------------------------------------------
    def _box(self, lo, hi):
        """Slices covering [lo, hi] mm per axis (z, y, x), or None when outside the volume."""
        sl = []
        for ax, a, b in zip(self.axes, lo, hi):
            i0 = int(np.searchsorted(ax, a, side="left"))
            i1 = int(np.searchsorted(ax, b, side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def _grid(self, sl):
        z, y, x = (ax[s] for ax, s in zip(self.axes, sl))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def ellipsoid(self, c, r):
        """Boolean region of an axis-aligned ellipsoid; centre c and radii r in (z, y, x) mm."""
        c, r = np.asarray(c, float), np.maximum(np.asarray(r, float), 1e-3)
        sl = self._box(c - r, c + r)
        if sl is None:
            return None
        z, y, x = self._grid(sl)
        return sl, ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0

    def capsule(self, p0, p1, radius):
        """Boolean region within `radius` mm of the segment p0-p1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        sl = self._box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        if sl is None:
            return None
        z, y, x = self._grid(sl)
        d = p1 - p0
        L2 = max(float(d @ d), 1e-9)
        t = np.clip(((z - p0[0]) * d[0] + (y - p0[1]) * d[1] + (x - p0[2]) * d[2]) / L2, 0.0, 1.0)
        dist2 = (z - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (x - p0[2] - t * d[2]) ** 2
        return sl, dist2 <= radius * radius

    def elliptic_cylinder(self, cy, cx, ry, rx, z0, z1):
        sl = self._box((z0, cy - ry, cx - rx), (z1, cy + ry, cx + rx))
        if sl is None:
            return None
        _, y, x = self._grid(sl)
        m = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        return sl, np.broadcast_to(m, tuple(s.stop - s.start for s in sl))

    # -- painting -------------------------------------------------------------------------
    def paint(self, region, hu=None, label=None, within=None, add=None, clear_label=None) -> int:
        """Set (or add to) HU in `region`; `within` restricts to voxels whose label is in it.

        Returns the number of voxels painted, so callers can check a finding landed.
        """
        if region is None:
            return 0
        sl, m = region
        m = np.array(m, dtype=bool, copy=True)
        if within is not None:
            m &= np.isin(self.label[sl], list(within))
        n = int(m.sum())
        if n == 0:
            return 0
        view = self.hu[sl]
        if hu is not None:
            view[m] = hu
        if add is not None:
            view[m] += add if np.isscalar(add) else add[m]
        if label is not None or clear_label is not None:
            self.label[sl][m] = label if label is not None else clear_label
            self._points.clear()
        return n

    def random_point(self, rng, label: int, where=None):
        """A random voxel centre (mm) with this label, optionally filtered by where(z, y, x)."""
        if label not in self._points:
            idx = np.flatnonzero(self.label.ravel() == label)
            pts = np.stack(np.unravel_index(idx, self.shape), axis=1)
            self._points[label] = np.stack([self.axes[a][pts[:, a]] for a in range(3)], axis=1)
        mm = self._points[label]
        if len(mm) == 0:
            return None
        if where is not None:
            keep = where(mm[:, 0], mm[:, 1], mm[:, 2])
            if keep.any():
                mm = mm[keep]
        return mm[rng.integers(len(mm))]
