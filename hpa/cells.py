"""The cells of a synthetic image (hpa.synthetic): their geometry, drawing primitives and reference channels.

Each image holds a few cells at random positions (some cut by the border). `make_cells` gives per-pixel fields
of the owning cell (distance to its nucleus and rim, angle, soft body and nucleus masks) and per-cell landmarks
(centres, nuclear axes, nucleoli, the perinuclear direction); `dots`, `segment`, `ring` and `random_points`
draw the spots, filaments and rings the organelle patterns (hpa.organelles) are made of; `microtubules` and
`reticulum` are the red and yellow reference structures. Geometry is in units of size/64, so a 512 px image
looks like a 64 px one at higher resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass
class Cells:
    """Per-pixel fields of the owning cell, plus per-cell landmarks, for one image."""

    unit: float                 # pixels per 1/64 of the image side
    yy: np.ndarray              # pixel coordinates (H, W)
    xx: np.ndarray
    owner: np.ndarray           # index of the nearest cell (H, W)
    dn: np.ndarray              # normalised distance to the owner's nucleus centre (1 = nuclear rim)
    dc: np.ndarray              # normalised distance to the owner's centre (1 = plasma membrane)
    dc2: np.ndarray             # same for the second nearest cell (cell junctions)
    theta: np.ndarray           # angle around the owner's centre
    body: np.ndarray            # soft cell-body mask
    nucleus: np.ndarray         # soft nucleus mask
    centers: np.ndarray         # (K, 2) cell centres (y, x)
    nuc_centers: np.ndarray     # (K, 2)
    nuc_axes: np.ndarray        # (K, 2) semi-axes (along, across) in pixels
    nuc_angle: np.ndarray       # (K,)
    radius: np.ndarray          # (K,) cell radius in pixels
    golgi_angle: np.ndarray     # (K,) direction of the perinuclear region
    nucleoli: list              # per cell: (M, 2) nucleolus centres


def smooth_noise(rng, shape, sigma) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-6)


def _place_centers(rng, n_cells, size, radius) -> np.ndarray:
    centers = []
    for _ in range(n_cells * 30):
        if len(centers) == n_cells:
            break
        c = rng.uniform(-0.05 * size, 1.05 * size, 2)
        if all(np.hypot(*(c - o)) > 1.35 * radius for o in centers):
            centers.append(c)
    return np.array(centers, dtype=np.float32)


def nucleus_point(cells: Cells, i: int, dn: float, angle: float) -> np.ndarray:
    """Point at normalised nuclear distance dn in direction `angle` (image frame) from cell i's nucleus."""
    a, b = cells.nuc_axes[i]
    phi = angle - cells.nuc_angle[i]
    r = dn / np.hypot(np.cos(phi) / a, np.sin(phi) / b)
    return cells.nuc_centers[i] + r * np.array([np.sin(angle), np.cos(angle)])


def make_cells(rng: np.random.Generator, size: int) -> Cells:
    unit = size / 64.0
    radius_mean = 12.5 * unit
    n_cells = int(rng.integers(4, 8))
    centers = _place_centers(rng, n_cells, size, radius_mean)
    k = len(centers)
    radius = (radius_mean * rng.uniform(0.8, 1.15, k)).astype(np.float32)
    nuc_axes = np.stack([radius * rng.uniform(0.42, 0.52, k), radius * rng.uniform(0.33, 0.42, k)], 1)
    nuc_angle = rng.uniform(0, np.pi, k)
    offset_angle = rng.uniform(0, 2 * np.pi, k)
    nuc_centers = centers + (radius * rng.uniform(0, 0.15, k))[:, None] * np.stack(
        [np.sin(offset_angle), np.cos(offset_angle)], 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    dy = yy[None] - centers[:, 0, None, None]
    dx = xx[None] - centers[:, 1, None, None]
    theta = np.arctan2(dy, dx)
    wobble = 1.0
    for harmonic, amp in ((2, 0.16), (3, 0.08), (5, 0.04)):
        phase = rng.uniform(0, 2 * np.pi, k)[:, None, None]
        wobble = wobble + amp * np.cos(harmonic * theta + phase)
    dc = np.hypot(dy, dx) / (radius[:, None, None] * wobble)

    ny = yy[None] - nuc_centers[:, 0, None, None]
    nx = xx[None] - nuc_centers[:, 1, None, None]
    cos, sin = np.cos(nuc_angle)[:, None, None], np.sin(nuc_angle)[:, None, None]
    u, v = nx * cos + ny * sin, -nx * sin + ny * cos
    dn = np.hypot(u / nuc_axes[:, 0, None, None], v / nuc_axes[:, 1, None, None])

    order = np.argsort(dc, axis=0)
    owner = order[0]
    take = lambda a, idx=owner: np.take_along_axis(a, idx[None], 0)[0]  # noqa: E731
    dc1, dn1 = take(dc), take(dn)
    dc2 = np.take_along_axis(dc, order[1:2], 0)[0] if k > 1 else np.full_like(dc1, 9.0)
    edge = 0.08
    body = np.clip((1.0 - dc1) / edge + 0.5, 0, 1)
    nucleus = np.clip((1.0 - dn1) / 0.15 + 0.5, 0, 1) * (dn1 < 1.3) * (body > 0)
    golgi_angle = rng.uniform(0, 2 * np.pi, k)
    cells = Cells(unit, yy, xx, owner, dn1, dc1, dc2, take(theta), body, nucleus, centers,
                  nuc_centers, nuc_axes, nuc_angle, radius, golgi_angle, [])
    for i in range(k):
        m = int(rng.integers(2, 5))
        cells.nucleoli.append(np.array([nucleus_point(cells, i, rng.uniform(0.1, 0.6), rng.uniform(0, 2 * np.pi))
                                        for _ in range(m)], dtype=np.float32))
    return cells


# ---------------------------------------------------------------------------------------------
# Drawing primitives


def dots(cells: Cells, points, sigma: float, amps=None) -> np.ndarray:
    """Gaussian spots of width sigma (pixels) at points (K, 2) (y, x); peak ~ amp."""
    shape = cells.yy.shape
    img = np.zeros(shape, np.float32)
    points = np.asarray(points, np.float32).reshape(-1, 2)
    if len(points):
        iy = np.rint(points[:, 0]).astype(int)
        ix = np.rint(points[:, 1]).astype(int)
        amps = np.ones(len(points), np.float32) if amps is None else np.asarray(amps, np.float32)
        keep = (iy >= 0) & (iy < shape[0]) & (ix >= 0) & (ix < shape[1])
        np.add.at(img, (iy[keep], ix[keep]), amps[keep])
    sigma = max(sigma, 0.5)
    return gaussian_filter(img, sigma, truncate=3.0) * (2 * np.pi * sigma**2)


def segment(p0, p1, step=0.5) -> np.ndarray:
    n = max(int(np.hypot(*(np.asarray(p1) - p0)) / step), 2)
    t = np.linspace(0, 1, n)[:, None]
    return np.asarray(p0) * (1 - t) + np.asarray(p1) * t


def ring(center, r, step=0.5) -> np.ndarray:
    n = max(int(2 * np.pi * r / step), 6)
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.asarray(center) + r * np.stack([np.sin(a), np.cos(a)], 1)


def random_points(rng, cells: Cells, i: int, n: int, lo: float, hi: float, region: str) -> np.ndarray:
    """n points of cell i: region 'nucleus' (dn in [lo, hi]) or 'cyto' (cell-radius fraction [lo, hi])."""
    ang = rng.uniform(0, 2 * np.pi, n)
    frac = rng.uniform(lo, hi, n)
    if region == "nucleus":
        return np.array([nucleus_point(cells, i, f, a) for f, a in zip(frac, ang)], np.float32).reshape(-1, 2)
    # Cytoplasm: between the nuclear rim (frac 0) and the cell rim (frac 1).
    inner = np.array([nucleus_point(cells, i, 1.15, a) for a in ang]).reshape(-1, 2)
    outer = cells.centers[i] + 0.9 * cells.radius[i] * np.stack([np.sin(ang), np.cos(ang)], 1)
    return (inner * (1 - frac[:, None]) + outer * frac[:, None]).astype(np.float32)


def saturate(field: np.ndarray) -> np.ndarray:
    """Patterns are built with peaks ~1; overlapping spots saturate like a real detector."""
    return np.clip(field, 0.0, 1.0)


def cytoplasm(cells: Cells) -> np.ndarray:
    return cells.body * (1 - cells.nucleus)


# ---------------------------------------------------------------------------------------------
# Reference channels


def microtubules(rng, cells: Cells, warp: np.ndarray, rays: int) -> np.ndarray:
    # Radial filaments from the centre, bent by a smooth warp that grows with the distance.
    bend = warp * (1.0 + 2.5 * cells.dc)
    filaments = (0.5 + 0.5 * np.cos(rays * cells.theta + bend)) ** 8
    filaments += 0.6 * (0.5 + 0.5 * np.cos((rays + 5) * cells.theta - 0.7 * bend + 1.0)) ** 8
    return filaments * np.clip(cells.dc * 1.4, 0, 1) * cells.body


def reticulum(cells: Cells, noise: np.ndarray) -> np.ndarray:
    net = np.exp(-(noise / 0.35) ** 2)
    perinuclear = np.exp(-np.clip(cells.dn - 1, 0, None) / 1.2)
    return net * perinuclear * cytoplasm(cells)
