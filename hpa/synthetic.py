"""Synthetic HPA-like data in the exact Kaggle layout: the embedded default dataset.

Labels follow the real HPA train statistics (`hpa.labels`): the number of labels per image and the
per-class counts are scaled to N (largest-remainder rounding), so class frequencies match the real
ones up to rounding, and every class appears at least once when N >= 28.

Images look like immunofluorescence of cells. Each image holds a few cells at random positions
(some cut by the border): blue = DAPI nuclei (with darker nucleoli), red = radial microtubules,
yellow = reticular ER, both within irregular cell bodies. The green channel (the protein of
interest) is the sum of one spatial pattern per label, placed relative to the reference structures
(nucleus, nucleoli, nuclear rim, cell rim, perinuclear region, ...). Similar classes share
similar patterns (nucleoli vs fibrillar centers, MTOC vs centrosome, peroxisomes vs endosomes vs
lysosomes), rare ones are weak, not every cell expresses, and gain and noise vary per image,
so a small CNN learns the task well above a label-frequency baseline but not perfectly.

Geometry is expressed in units of size/64, so a 512 px image looks like a 64 px one at higher
resolution. Each image has its own random stream derived from (seed, split, index): the output is
byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from hpa.errors import ConfigError
from hpa.labels import COLORS, HPA_CLASS_COUNTS, HPA_LABELS_PER_IMAGE, NUM_CLASSES, format_target

log = logging.getLogger(__name__)

# Peak brightness of each class's green pattern (before per-image gain). Rare or subtle classes are
# weaker so that they stay hard, as in the real data.
CLASS_AMPLITUDE = np.array([
    0.85, 0.8, 0.9, 0.55, 0.7, 0.8, 0.7, 0.9, 0.45, 0.5, 0.5, 0.7, 0.7, 0.55, 0.7, 0.45,
    0.7, 0.8, 0.8, 0.7, 0.6, 0.8, 0.6, 0.8, 0.9, 0.55, 0.8, 0.5,
], dtype=np.float32)
EXPRESSING_CELL_FRACTION = 0.8  # a cell shows the protein with this probability (at least one does)
PNG_COMPRESS_LEVEL = 1


# ---------------------------------------------------------------------------------------------
# Labels


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` that sum exactly to `total`."""
    quota = weights / weights.sum() * total
    counts = np.floor(quota).astype(np.int64)
    short = total - counts.sum()
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def _class_targets(total_labels: int, n: int) -> np.ndarray:
    targets = _largest_remainder(HPA_CLASS_COUNTS.astype(np.float64), total_labels)
    if n >= NUM_CLASSES:  # every class present: take the missing ones from the largest classes
        for c in np.flatnonzero(targets == 0):
            targets[np.argmax(targets)] -= 1
            targets[c] = 1
    return targets


def _top_k_weighted(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices drawn with probability proportional to weights (Gumbel top-k)."""
    keys = np.full(weights.shape, -np.inf)
    pos = weights > 0
    keys[pos] = np.log(weights[pos]) + rng.gumbel(size=int(pos.sum()))
    if k >= pos.sum():
        return np.flatnonzero(pos)
    return np.argpartition(-keys, k)[:k]


def sample_labels(n: int, rng: np.random.Generator) -> list[list[int]]:
    """Label sets for n images with the real HPA label statistics scaled to n.

    The number of labels per image and the number of images per class are both fixed by scaling
    the real counts to n; classes are then dealt out largest first, each to images chosen with
    probability proportional to their remaining free slots, so no image gets a class twice.
    """
    if n <= 0:
        return []
    sizes = np.array(sorted(HPA_LABELS_PER_IMAGE))
    k = np.repeat(sizes, _largest_remainder(np.array([HPA_LABELS_PER_IMAGE[s] for s in sizes], float), n))
    k = rng.permutation(k)
    targets = _class_targets(int(k.sum()), n)
    free = k.astype(np.float64)
    onehot = np.zeros((n, NUM_CLASSES), dtype=bool)
    for c in np.argsort(-targets, kind="stable"):
        rows = _top_k_weighted(rng, free, int(targets[c]))
        onehot[rows, c] = True
        free[rows] -= 1
    # Slots left over when the dealing ran short: an image must still have at least one label.
    for i in np.flatnonzero(~onehot.any(axis=1)):
        onehot[i, rng.choice(NUM_CLASSES, p=HPA_CLASS_COUNTS / HPA_CLASS_COUNTS.sum())] = True
    return [np.flatnonzero(row).tolist() for row in onehot]


def make_ids(n: int, rng: np.random.Generator) -> list[str]:
    """Kaggle-looking ids (uuid strings), unique, deterministic for the generator state."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        value = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        if value not in seen:
            seen.add(value)
            ids.append(value)
    return ids


# ---------------------------------------------------------------------------------------------
# Cell geometry


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


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
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


def _nucleus_point(cells: Cells, i: int, dn: float, angle: float) -> np.ndarray:
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
        cells.nucleoli.append(np.array([_nucleus_point(cells, i, rng.uniform(0.1, 0.6), rng.uniform(0, 2 * np.pi))
                                        for _ in range(m)], dtype=np.float32))
    return cells


# ---------------------------------------------------------------------------------------------
# Rendering helpers


def _dots(cells: Cells, points, sigma: float, amps=None) -> np.ndarray:
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


def _segment(p0, p1, step=0.5) -> np.ndarray:
    n = max(int(np.hypot(*(np.asarray(p1) - p0)) / step), 2)
    t = np.linspace(0, 1, n)[:, None]
    return np.asarray(p0) * (1 - t) + np.asarray(p1) * t


def _ring(center, r, step=0.5) -> np.ndarray:
    n = max(int(2 * np.pi * r / step), 6)
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.asarray(center) + r * np.stack([np.sin(a), np.cos(a)], 1)


def _random_points(rng, cells: Cells, i: int, n: int, lo: float, hi: float, region: str) -> np.ndarray:
    """n points of cell i: region 'nucleus' (dn in [lo, hi]) or 'cyto' (cell-radius fraction [lo, hi])."""
    ang = rng.uniform(0, 2 * np.pi, n)
    frac = rng.uniform(lo, hi, n)
    if region == "nucleus":
        return np.array([_nucleus_point(cells, i, f, a) for f, a in zip(frac, ang)], np.float32).reshape(-1, 2)
    # Cytoplasm: between the nuclear rim (frac 0) and the cell rim (frac 1).
    inner = np.array([_nucleus_point(cells, i, 1.15, a) for a in ang]).reshape(-1, 2)
    outer = cells.centers[i] + 0.9 * cells.radius[i] * np.stack([np.sin(ang), np.cos(ang)], 1)
    return (inner * (1 - frac[:, None]) + outer * frac[:, None]).astype(np.float32)


def _saturate(field: np.ndarray) -> np.ndarray:
    """Patterns are built with peaks ~1; overlapping spots saturate like a real detector."""
    return np.clip(field, 0.0, 1.0)


def _cytoplasm(cells: Cells) -> np.ndarray:
    return cells.body * (1 - cells.nucleus)


# ---------------------------------------------------------------------------------------------
# Reference channels


def _microtubules(rng, cells: Cells, warp: np.ndarray, rays: int) -> np.ndarray:
    # Radial filaments from the centre, bent by a smooth warp that grows with the distance.
    bend = warp * (1.0 + 2.5 * cells.dc)
    filaments = (0.5 + 0.5 * np.cos(rays * cells.theta + bend)) ** 8
    filaments += 0.6 * (0.5 + 0.5 * np.cos((rays + 5) * cells.theta - 0.7 * bend + 1.0)) ** 8
    return filaments * np.clip(cells.dc * 1.4, 0, 1) * cells.body


def _reticulum(cells: Cells, noise: np.ndarray) -> np.ndarray:
    net = np.exp(-(noise / 0.35) ** 2)
    perinuclear = np.exp(-np.clip(cells.dn - 1, 0, None) / 1.2)
    return net * perinuclear * _cytoplasm(cells)


# ---------------------------------------------------------------------------------------------
# Green patterns, one per class: pattern(rng, cells, expressing_cells, ctx) -> field (max ~1)


def _p_nucleoplasm(rng, cells, on, ctx):
    holes = _dots(cells, np.concatenate([cells.nucleoli[i] for i in on]), 1.3 * cells.unit)
    return cells.nucleus * (0.85 + 0.15 * ctx["fine"]) * (1 - 0.6 * np.clip(holes, 0, 1))


def _p_nuclear_membrane(rng, cells, on, ctx):
    return np.exp(-((cells.dn - 1.0) / 0.13) ** 2) * (cells.body > 0)


def _p_nucleoli(rng, cells, on, ctx):
    return _dots(cells, np.concatenate([cells.nucleoli[i] for i in on]), 1.5 * cells.unit)


def _p_fibrillar_center(rng, cells, on, ctx):
    pts = [p + rng.normal(0, 0.9 * cells.unit, (3, 2)) for i in on for p in cells.nucleoli[i]]
    return _dots(cells, np.concatenate(pts), 0.55 * cells.unit)


def _p_speckles(rng, cells, on, ctx):
    pts = np.concatenate([_random_points(rng, cells, i, 14, 0.0, 0.85, "nucleus") for i in on])
    return _dots(cells, pts, 0.75 * cells.unit, rng.uniform(0.5, 1, len(pts))) + 0.15 * cells.nucleus


def _p_nuclear_bodies(rng, cells, on, ctx):
    pts = np.concatenate([_random_points(rng, cells, i, int(rng.integers(2, 5)), 0.1, 0.8, "nucleus") for i in on])
    return _dots(cells, pts, 0.6 * cells.unit)


def _p_er(rng, cells, on, ctx):
    return ctx["er"]


def _p_golgi(rng, cells, on, ctx):
    pts = []
    for i in on:
        a = cells.golgi_angle[i] + rng.normal(0, 0.35, 7)
        pts += [_nucleus_point(cells, i, d, t) for d, t in zip(rng.uniform(1.15, 1.6, 7), a)]
    return _dots(cells, np.array(pts), 1.0 * cells.unit)


def _puncta(rng, cells, on, n, sigma, lo, hi):
    pts = np.concatenate([_random_points(rng, cells, i, n, lo, hi, "cyto") for i in on])
    return _dots(cells, pts, sigma * cells.unit, rng.uniform(0.6, 1, len(pts)))


def _p_peroxisomes(rng, cells, on, ctx):
    return _puncta(rng, cells, on, 22, 0.5, 0.0, 1.0)


def _p_endosomes(rng, cells, on, ctx):
    return _puncta(rng, cells, on, 14, 0.7, 0.0, 0.7)


def _p_lysosomes(rng, cells, on, ctx):
    return _puncta(rng, cells, on, 9, 0.9, 0.0, 0.45)


def _p_intermediate_filaments(rng, cells, on, ctx):
    rings = (0.5 + 0.5 * np.cos(2.2 * cells.dn * 2 * np.pi + 2.0 * ctx["warp2"])) ** 6
    return rings * _cytoplasm(cells)


def _p_actin(rng, cells, on, ctx):
    alpha = ctx["actin_angle"]
    proj = cells.xx * np.cos(alpha) + cells.yy * np.sin(alpha)
    fibers = (0.5 + 0.5 * np.cos(proj * 2 * np.pi / (3.0 * cells.unit) + 0.8 * ctx["warp2"])) ** 8
    return fibers * np.clip(cells.dc * 1.3 - 0.2, 0, 1) * cells.body


def _p_focal_adhesions(rng, cells, on, ctx):
    pts = []
    for i in on:
        for a in rng.uniform(0, 2 * np.pi, 9):
            d = np.array([np.sin(a), np.cos(a)])
            pts.append(_segment(cells.centers[i] + 0.72 * cells.radius[i] * d, cells.centers[i] + 0.9 * cells.radius[i] * d))
    return _dots(cells, np.concatenate(pts), 0.5 * cells.unit)


def _p_microtubules(rng, cells, on, ctx):
    return ctx["tubules"]


def _p_microtubule_ends(rng, cells, on, ctx):
    pts = []
    for i in on:
        rays = ctx["rays"]
        a = (2 * np.pi * rng.integers(0, rays, 12) + rng.normal(0, 0.1, 12)) / rays
        r = rng.uniform(0.7, 0.92, 12) * cells.radius[i]
        pts.append(cells.centers[i] + r[:, None] * np.stack([np.sin(a), np.cos(a)], 1))
    return _dots(cells, np.concatenate(pts), 0.55 * cells.unit)


def _p_cytokinetic_bridge(rng, cells, on, ctx):
    i = on[0]
    a = rng.uniform(0, 2 * np.pi)
    d = np.array([np.sin(a), np.cos(a)])
    p0 = cells.centers[i] + 0.85 * cells.radius[i] * d
    p1 = p0 + 0.7 * cells.radius[i] * d
    mid = (p0 + p1) / 2
    return _dots(cells, _segment(p0, p1), 0.5 * cells.unit) * 0.5 + _dots(cells, mid, 0.9 * cells.unit)


def _p_mitotic_spindle(rng, cells, on, ctx):
    i = on[0]
    a = cells.nuc_angle[i]
    d = np.array([np.sin(a), np.cos(a)])
    n = np.array([-d[1], d[0]])
    half = 0.9 * cells.nuc_axes[i, 0]
    c = cells.nuc_centers[i]
    poles = (c - half * d, c + half * d)
    fibers = [_segment(poles[0], c + s * n) for s in np.linspace(-0.5, 0.5, 5) * cells.nuc_axes[i, 1]]
    fibers += [_segment(poles[1], c + s * n) for s in np.linspace(-0.5, 0.5, 5) * cells.nuc_axes[i, 1]]
    return _dots(cells, np.concatenate(fibers), 0.5 * cells.unit) + _dots(cells, np.array(poles), 0.8 * cells.unit)


def _mtoc(cells, i):
    return _nucleus_point(cells, i, 1.35, cells.golgi_angle[i])


def _p_mtoc(rng, cells, on, ctx):
    return _dots(cells, np.array([_mtoc(cells, i) for i in on]), 0.9 * cells.unit) + 0.08 * _cytoplasm(cells)


def _p_centrosome(rng, cells, on, ctx):
    pts = [_mtoc(cells, i) + s * rng.normal(0, 1.0, 2) * cells.unit for i in on for s in (0.0, 1.5)]
    return _dots(cells, np.array(pts), 0.6 * cells.unit)


def _p_lipid_droplets(rng, cells, on, ctx):
    pts = [_ring(p, 1.3 * cells.unit) for i in on for p in _random_points(rng, cells, i, 4, 0.1, 0.9, "cyto")]
    return _dots(cells, np.concatenate(pts), 0.45 * cells.unit)


def _p_plasma_membrane(rng, cells, on, ctx):
    return np.exp(-((cells.dc - 0.97) / 0.07) ** 2) + 0.1 * _cytoplasm(cells)


def _p_cell_junctions(rng, cells, on, ctx):
    contact = np.exp(-((cells.dc2 - cells.dc) / 0.12) ** 2) * (cells.dc < 1.05)
    return contact + 0.35 * np.exp(-((cells.dc - 0.97) / 0.07) ** 2)


def _p_mitochondria(rng, cells, on, ctx):
    threads = []
    for i in on:  # short tubules with random orientation, denser near the nucleus
        for p in _random_points(rng, cells, i, 14, 0.0, 0.8, "cyto"):
            a = rng.uniform(0, np.pi)
            d = rng.uniform(1.0, 2.2) * cells.unit * np.array([np.sin(a), np.cos(a)])
            threads.append(_segment(p - d, p + d))
    return _dots(cells, np.concatenate(threads), 0.5 * cells.unit)


def _p_aggresome(rng, cells, on, ctx):
    pts = [_nucleus_point(cells, i, 1.45, cells.golgi_angle[i] + 0.3) for i in on[:2]]
    return _dots(cells, np.array(pts), 1.8 * cells.unit)


def _p_cytosol(rng, cells, on, ctx):
    return _cytoplasm(cells) * (0.75 + 0.25 * np.clip(ctx["fine"], -1, 1))


def _p_cytoplasmic_bodies(rng, cells, on, ctx):
    pts = np.concatenate([_random_points(rng, cells, i, int(rng.integers(1, 3)), 0.2, 0.8, "cyto") for i in on])
    return _dots(cells, pts, 1.0 * cells.unit)


def _p_rods_rings(rng, cells, on, ctx):
    pts = []
    for i in on:
        for p in _random_points(rng, cells, i, 2, 0.1, 0.8, "cyto"):
            if rng.random() < 0.5:
                pts.append(_ring(p, 1.0 * cells.unit))
            else:
                a = rng.uniform(0, np.pi)
                d = 1.6 * cells.unit * np.array([np.sin(a), np.cos(a)])
                pts.append(_segment(p - d, p + d))
    return _dots(cells, np.concatenate(pts), 0.45 * cells.unit)


PATTERNS = (
    _p_nucleoplasm, _p_nuclear_membrane, _p_nucleoli, _p_fibrillar_center, _p_speckles,
    _p_nuclear_bodies, _p_er, _p_golgi, _p_peroxisomes, _p_endosomes, _p_lysosomes,
    _p_intermediate_filaments, _p_actin, _p_focal_adhesions, _p_microtubules, _p_microtubule_ends,
    _p_cytokinetic_bridge, _p_mitotic_spindle, _p_mtoc, _p_centrosome, _p_lipid_droplets,
    _p_plasma_membrane, _p_cell_junctions, _p_mitochondria, _p_aggresome, _p_cytosol,
    _p_cytoplasmic_bodies, _p_rods_rings,
)
assert len(PATTERNS) == NUM_CLASSES


def _to_uint8(field: np.ndarray) -> np.ndarray:
    return (np.clip(field, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_image(labels: list[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic RGBY image with the given labels -> uint8 (4, size, size)."""
    cells = make_cells(rng, size)
    shape = (size, size)
    unit = cells.unit
    rays = int(rng.integers(14, 22))
    ctx = {
        "warp": _smooth_noise(rng, shape, 3.0 * unit),
        "warp2": _smooth_noise(rng, shape, 4.0 * unit),
        "fine": _smooth_noise(rng, shape, 1.0 * unit),
        "fine2": _smooth_noise(rng, shape, 1.6 * unit),
        "rays": rays,
        "actin_angle": rng.uniform(0, np.pi),
    }
    ctx["tubules"] = _microtubules(rng, cells, ctx["warp"], rays)
    ctx["er"] = _reticulum(cells, _smooth_noise(rng, shape, 1.3 * unit))
    k = len(cells.centers)
    cell_gain = rng.uniform(0.6, 1.0, k).astype(np.float32)[cells.owner]

    nucleus = nucleus_mask = cells.nucleus
    if 17 in labels:  # metaphase: the first cell's chromatin condenses into a plate across the spindle
        plate = np.exp(-(((cells.xx - cells.nuc_centers[0, 1]) * np.cos(cells.nuc_angle[0])
                          + (cells.yy - cells.nuc_centers[0, 0]) * np.sin(cells.nuc_angle[0])) / (1.2 * unit)) ** 2)
        nucleus = np.where(cells.owner == 0, nucleus * (0.25 + 0.9 * plate), nucleus)
    holes = _dots(cells, np.concatenate(cells.nucleoli), 1.3 * unit)
    blue = nucleus * (0.8 + 0.12 * ctx["fine"]) * (1 - 0.35 * np.clip(holes, 0, 1)) * cell_gain
    red = (0.55 * ctx["tubules"] + 0.18 * cells.body * (1 + 0.3 * ctx["warp2"])) * cell_gain
    yellow = (0.6 * ctx["er"] + 0.12 * cells.body) * cell_gain

    # The protein patterns draw from their own stream, so the reference channels (and the noise)
    # of an image do not depend on its labels.
    label_rng = rng.spawn(1)[0]
    green = np.zeros(shape, np.float32)
    for c in labels:
        on = [i for i in range(k) if label_rng.random() < EXPRESSING_CELL_FRACTION] or [0]
        if c in (16, 17):  # one dividing cell per image
            on = [0]
        field = _saturate(PATTERNS[c](label_rng, cells, on, ctx))
        expressing = np.isin(cells.owner, on) if c not in (16, 17, 22) else np.ones(shape, bool)
        green += CLASS_AMPLITUDE[c] * label_rng.uniform(0.4, 1.0) * field * expressing
    # Unspecific background staining of nucleus and cytoplasm: weak Nucleoplasm/Cytosol look alike.
    haze = rng.uniform(0.0, 0.12) * nucleus_mask + rng.uniform(0.02, 0.12) * _cytoplasm(cells)
    green = green * rng.uniform(0.7, 1.2) + haze

    channels = []
    for field, noise in ((red, 0.035), (green, 0.04), (blue, 0.03), (yellow, 0.035)):
        field = gaussian_filter(field.astype(np.float32), 0.5 * unit) if unit > 1 else field
        field = field * rng.uniform(0.8, 1.15) + 0.02 + noise * rng.standard_normal(shape).astype(np.float32)
        channels.append(_to_uint8(field))
    return np.stack(channels)


# ---------------------------------------------------------------------------------------------
# Kaggle layout writer


def _write_png(path: Path, plane: np.ndarray) -> None:
    Image.fromarray(plane).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _write_csv(path: Path, header: str, rows: list[tuple[str, str]]) -> None:
    text = header + "\n" + "".join(f"{a},{b}\n" for a, b in rows)
    path.write_text(text, encoding="utf-8", newline="\n")


def _write_split(out: Path, split: int, name: str, ids, labels, size, seed) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image_id, target) in enumerate(zip(ids, labels)):
        image = render_image(target, size, np.random.default_rng([seed, split, i]))
        for color, plane in zip(COLORS, image):
            _write_png(folder / f"{image_id}_{color}.png", plane)


def generate(out_dir, n_train: int, n_test: int, size: int = 64, seed: int = 0) -> dict:
    """Write a synthetic dataset in the Kaggle layout under out_dir; returns a summary dict.

    train.csv, train/, and (when n_test > 0) sample_submission.csv, test_labels.csv, test/.
    """
    if n_train < 1 or n_test < 0:
        raise ConfigError(f"synth: need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if not 16 <= size <= 4096:
        raise ConfigError(f"synth: size must be in 16..4096 pixels, got {size}")
    if seed < 0:
        raise ConfigError(f"synth: seed must be >= 0, got {seed}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = np.random.default_rng([seed, 7])
    ids = make_ids(n_train + n_test, root)
    train_ids, test_ids = ids[:n_train], ids[n_train:]
    train_labels = sample_labels(n_train, np.random.default_rng([seed, 1]))
    test_labels = sample_labels(n_test, np.random.default_rng([seed, 2]))
    _write_split(out, 0, "train", train_ids, train_labels, size, seed)
    # CSVs after the images (a half-written directory has no train.csv) and sorted by Id, like Kaggle's.
    # With n_test = 0 there is no test part at all (an empty sample_submission.csv would not validate).
    if n_test:
        _write_split(out, 1, "test", test_ids, test_labels, size, seed)
        test_rows = sorted(zip(test_ids, map(format_target, test_labels)))
        _write_csv(out / "test_labels.csv", "Id,Target", test_rows)
        _write_csv(out / "sample_submission.csv", "Id,Predicted", [(i, "0") for i, _ in test_rows])
    _write_csv(out / "train.csv", "Id,Target", sorted(zip(train_ids, map(format_target, train_labels))))
    counts = np.zeros(NUM_CLASSES, dtype=int)
    for labels in train_labels:
        counts[labels] += 1
    seconds = time.perf_counter() - start
    log.info("synth: wrote %d train + %d test images of %d px to %s in %.1f s", n_train, n_test, size, out, seconds)
    return {"out_dir": str(out), "n_train": n_train, "n_test": n_test, "size": size, "seed": seed,
            "class_counts": counts.tolist(), "seconds": round(seconds, 3)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa synth", description="Write synthetic HPA-like data in the Kaggle layout.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    summary = generate(os.fspath(args.out), args.n_train, args.n_test, args.size, args.seed)
    print(f"wrote {summary['n_train']} train and {summary['n_test']} test images "
          f"({summary['size']} px) to {summary['out_dir']} in {summary['seconds']:.1f} s")
    return 0
