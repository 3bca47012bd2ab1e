"""The green channel of a synthetic image (hpa.synthetic): one spatial pattern per HPA class.

`PATTERNS[c](rng, cells, on, ctx)` draws class c's protein in the expressing cells `on` (a field with peaks ~1),
placed relative to the reference structures of hpa.cells (nucleus, nucleoli, nuclear rim, cell rim, perinuclear
region, ...). Similar classes share similar patterns (nucleoli vs fibrillar centers, MTOC vs centrosome,
peroxisomes vs endosomes vs lysosomes); `CLASS_AMPLITUDE` keeps rare or subtle classes weak, as in the real data.
"""

from __future__ import annotations

import numpy as np

from hpa.cells import cytoplasm, dots, nucleus_point, random_points, ring, segment
from hpa.labels import NUM_CLASSES

# Peak brightness of each class's green pattern (before per-image gain). Rare or subtle classes are
# weaker so that they stay hard, as in the real data.
CLASS_AMPLITUDE = np.array([
    0.85, 0.8, 0.9, 0.55, 0.7, 0.8, 0.7, 0.9, 0.45, 0.5, 0.5, 0.7, 0.7, 0.55, 0.7, 0.45,
    0.7, 0.8, 0.8, 0.7, 0.6, 0.8, 0.6, 0.8, 0.9, 0.55, 0.8, 0.5,
], dtype=np.float32)


def _p_nucleoplasm(rng, cells, on, ctx):
    holes = dots(cells, np.concatenate([cells.nucleoli[i] for i in on]), 1.3 * cells.unit)
    return cells.nucleus * (0.85 + 0.15 * ctx["fine"]) * (1 - 0.6 * np.clip(holes, 0, 1))


def _p_nuclear_membrane(rng, cells, on, ctx):
    return np.exp(-((cells.dn - 1.0) / 0.13) ** 2) * (cells.body > 0)


def _p_nucleoli(rng, cells, on, ctx):
    return dots(cells, np.concatenate([cells.nucleoli[i] for i in on]), 1.5 * cells.unit)


def _p_fibrillar_center(rng, cells, on, ctx):
    pts = [p + rng.normal(0, 0.9 * cells.unit, (3, 2)) for i in on for p in cells.nucleoli[i]]
    return dots(cells, np.concatenate(pts), 0.55 * cells.unit)


def _p_speckles(rng, cells, on, ctx):
    pts = np.concatenate([random_points(rng, cells, i, 14, 0.0, 0.85, "nucleus") for i in on])
    return dots(cells, pts, 0.75 * cells.unit, rng.uniform(0.5, 1, len(pts))) + 0.15 * cells.nucleus


def _p_nuclear_bodies(rng, cells, on, ctx):
    pts = np.concatenate([random_points(rng, cells, i, int(rng.integers(2, 5)), 0.1, 0.8, "nucleus") for i in on])
    return dots(cells, pts, 0.6 * cells.unit)


def _p_er(rng, cells, on, ctx):
    return ctx["er"]


def _p_golgi(rng, cells, on, ctx):
    pts = []
    for i in on:
        a = cells.golgi_angle[i] + rng.normal(0, 0.35, 7)
        pts += [nucleus_point(cells, i, d, t) for d, t in zip(rng.uniform(1.15, 1.6, 7), a)]
    return dots(cells, np.array(pts), 1.0 * cells.unit)


def _puncta(rng, cells, on, n, sigma, lo, hi):
    pts = np.concatenate([random_points(rng, cells, i, n, lo, hi, "cyto") for i in on])
    return dots(cells, pts, sigma * cells.unit, rng.uniform(0.6, 1, len(pts)))


def _p_peroxisomes(rng, cells, on, ctx):
    return _puncta(rng, cells, on, 22, 0.5, 0.0, 1.0)


def _p_endosomes(rng, cells, on, ctx):
    return _puncta(rng, cells, on, 14, 0.7, 0.0, 0.7)


def _p_lysosomes(rng, cells, on, ctx):
    return _puncta(rng, cells, on, 9, 0.9, 0.0, 0.45)


def _p_intermediate_filaments(rng, cells, on, ctx):
    rings = (0.5 + 0.5 * np.cos(2.2 * cells.dn * 2 * np.pi + 2.0 * ctx["warp2"])) ** 6
    return rings * cytoplasm(cells)


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
            c, r = cells.centers[i], cells.radius[i]
            pts.append(segment(c + 0.72 * r * d, c + 0.9 * r * d))
    return dots(cells, np.concatenate(pts), 0.5 * cells.unit)


def _p_microtubules(rng, cells, on, ctx):
    return ctx["tubules"]


def _p_microtubule_ends(rng, cells, on, ctx):
    pts = []
    for i in on:
        rays = ctx["rays"]
        a = (2 * np.pi * rng.integers(0, rays, 12) + rng.normal(0, 0.1, 12)) / rays
        r = rng.uniform(0.7, 0.92, 12) * cells.radius[i]
        pts.append(cells.centers[i] + r[:, None] * np.stack([np.sin(a), np.cos(a)], 1))
    return dots(cells, np.concatenate(pts), 0.55 * cells.unit)


def _p_cytokinetic_bridge(rng, cells, on, ctx):
    i = on[0]
    a = rng.uniform(0, 2 * np.pi)
    d = np.array([np.sin(a), np.cos(a)])
    p0 = cells.centers[i] + 0.85 * cells.radius[i] * d
    p1 = p0 + 0.7 * cells.radius[i] * d
    mid = (p0 + p1) / 2
    return dots(cells, segment(p0, p1), 0.5 * cells.unit) * 0.5 + dots(cells, mid, 0.9 * cells.unit)


def _p_mitotic_spindle(rng, cells, on, ctx):
    i = on[0]
    a = cells.nuc_angle[i]
    d = np.array([np.sin(a), np.cos(a)])
    n = np.array([-d[1], d[0]])
    half = 0.9 * cells.nuc_axes[i, 0]
    c = cells.nuc_centers[i]
    poles = (c - half * d, c + half * d)
    fibers = [segment(poles[0], c + s * n) for s in np.linspace(-0.5, 0.5, 5) * cells.nuc_axes[i, 1]]
    fibers += [segment(poles[1], c + s * n) for s in np.linspace(-0.5, 0.5, 5) * cells.nuc_axes[i, 1]]
    return dots(cells, np.concatenate(fibers), 0.5 * cells.unit) + dots(cells, np.array(poles), 0.8 * cells.unit)


def _mtoc(cells, i):
    return nucleus_point(cells, i, 1.35, cells.golgi_angle[i])


def _p_mtoc(rng, cells, on, ctx):
    return dots(cells, np.array([_mtoc(cells, i) for i in on]), 0.9 * cells.unit) + 0.08 * cytoplasm(cells)


def _p_centrosome(rng, cells, on, ctx):
    pts = [_mtoc(cells, i) + s * rng.normal(0, 1.0, 2) * cells.unit for i in on for s in (0.0, 1.5)]
    return dots(cells, np.array(pts), 0.6 * cells.unit)


def _p_lipid_droplets(rng, cells, on, ctx):
    pts = [ring(p, 1.3 * cells.unit) for i in on for p in random_points(rng, cells, i, 4, 0.1, 0.9, "cyto")]
    return dots(cells, np.concatenate(pts), 0.45 * cells.unit)


def _p_plasma_membrane(rng, cells, on, ctx):
    return np.exp(-((cells.dc - 0.97) / 0.07) ** 2) + 0.1 * cytoplasm(cells)


def _p_cell_junctions(rng, cells, on, ctx):
    contact = np.exp(-((cells.dc2 - cells.dc) / 0.12) ** 2) * (cells.dc < 1.05)
    return contact + 0.35 * np.exp(-((cells.dc - 0.97) / 0.07) ** 2)


def _p_mitochondria(rng, cells, on, ctx):
    threads = []
    for i in on:  # short tubules with random orientation, denser near the nucleus
        for p in random_points(rng, cells, i, 14, 0.0, 0.8, "cyto"):
            a = rng.uniform(0, np.pi)
            d = rng.uniform(1.0, 2.2) * cells.unit * np.array([np.sin(a), np.cos(a)])
            threads.append(segment(p - d, p + d))
    return dots(cells, np.concatenate(threads), 0.5 * cells.unit)


def _p_aggresome(rng, cells, on, ctx):
    pts = [nucleus_point(cells, i, 1.45, cells.golgi_angle[i] + 0.3) for i in on[:2]]
    return dots(cells, np.array(pts), 1.8 * cells.unit)


def _p_cytosol(rng, cells, on, ctx):
    return cytoplasm(cells) * (0.75 + 0.25 * np.clip(ctx["fine"], -1, 1))


def _p_cytoplasmic_bodies(rng, cells, on, ctx):
    pts = np.concatenate([random_points(rng, cells, i, int(rng.integers(1, 3)), 0.2, 0.8, "cyto") for i in on])
    return dots(cells, pts, 1.0 * cells.unit)


def _p_rods_rings(rng, cells, on, ctx):
    pts = []
    for i in on:
        for p in random_points(rng, cells, i, 2, 0.1, 0.8, "cyto"):
            if rng.random() < 0.5:
                pts.append(ring(p, 1.0 * cells.unit))
            else:
                a = rng.uniform(0, np.pi)
                d = 1.6 * cells.unit * np.array([np.sin(a), np.cos(a)])
                pts.append(segment(p - d, p + d))
    return dots(cells, np.concatenate(pts), 0.45 * cells.unit)


PATTERNS = (
    _p_nucleoplasm, _p_nuclear_membrane, _p_nucleoli, _p_fibrillar_center, _p_speckles,
    _p_nuclear_bodies, _p_er, _p_golgi, _p_peroxisomes, _p_endosomes, _p_lysosomes,
    _p_intermediate_filaments, _p_actin, _p_focal_adhesions, _p_microtubules, _p_microtubule_ends,
    _p_cytokinetic_bridge, _p_mitotic_spindle, _p_mtoc, _p_centrosome, _p_lipid_droplets,
    _p_plasma_membrane, _p_cell_junctions, _p_mitochondria, _p_aggresome, _p_cytosol,
    _p_cytoplasmic_bodies, _p_rods_rings,
)
assert len(PATTERNS) == NUM_CLASSES
