"""An analytic neck CT phantom: skull base, C1..C7 and the upper thoracic spine.

The anatomy is drawn by ``tooling.anatomy`` (in a spine-local frame, in mm);
every structure is an analytic shape evaluated on voxel coordinates, so the
label map comes from the same geometry as the intensities and always matches
them.

``render_phantom`` turns one random draw of this anatomy into an HU volume
(int16) and a label volume (uint8: 1..7 = C1..C7, 8.. = T1..), both shaped
(slices, rows, cols) and ordered head to feet, plus the boxes of the fracture
lines drawn into the fractured vertebrae.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from tooling.anatomy import LEVELS, PRESETS, Anatomy, Plane, Variety, Vertebra, sample_anatomy

CHUNK = 16  # slices rendered at once: bounds memory at large sizes
HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit unsigned file with intercept -1024 holds
SKULL_ID, MANDIBLE_ID, HYOID_ID, METAL_ID = 20, 21, 22, 23  # dense things that are not labelled
AIR, FAT, CSF, CORD, DISC, THYROID, HEMATOMA = -1000.0, -95.0, 8.0, 35.0, 80.0, 95.0, 30.0

@dataclass
class Phantom:
    """One rendered study.

    hu: (S, R, C) int16 HU, slice 0 = top of the neck. labels: (S, R, C) uint8,
    1..7 = C1..C7, 8.. = T1.., 0 elsewhere. spacing: (z, y, x) mm. origin:
    patient (x, y, z) (DICOM LPS) of voxel [0, 0, 0]; slice s lies at
    z = origin[2] - s * spacing[0]. boxes: (slice, x, y, width, height, vertebra)
    in pixels, around the fracture lines. kinds: fractured vertebra -> kind.
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    boxes: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    kinds: dict[int, str] = field(default_factory=dict)

    @property
    def z_positions(self) -> np.ndarray:
        """(S,) patient z of each slice, decreasing (head to feet)."""
        return self.origin[2] - np.arange(self.hu.shape[0]) * self.spacing[0]


def _ellipse(u, v, cu, cv, a, b) -> np.ndarray:
    return ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 <= 1.0


def _between(d, lo, hi) -> np.ndarray:
    return (d >= lo) & (d <= hi)


def _plane_dist(p: Plane, u, v, d) -> np.ndarray:
    return (u - p.point[0]) * p.normal[0] + (v - p.point[1]) * p.normal[1] + (d - p.point[2]) * p.normal[2]


def _body_mask(vt: Vertebra, u, v, d) -> np.ndarray:
    """Body (and C2's dens); a line fracture displaces the fragment beyond its first plane."""
    if vt.planes and vt.shift != (0.0, 0.0):
        beyond = _plane_dist(vt.planes[0], u, v, d) > 0
        u = np.where(beyond, u - vt.shift[0], u)
        v = np.where(beyond, v - vt.shift[1], v)
    # a wedge compression lowers the top end plate, most at the front
    top = vt.top + vt.wedge * np.clip((vt.v_body + vt.b_body - v) / (2 * vt.b_body), 0.0, 1.0)
    body = _ellipse(u, v, 0.0, vt.v_body, vt.a_body, vt.b_body) & (d >= top) & (d <= vt.bottom)
    if vt.dens is not None:
        v_dens, r, tip = vt.dens
        rad = r * np.sqrt(np.clip((d - tip) / (0.6 * r), 0.05, 1.0))  # rounded tip
        body |= (u ** 2 + (v - v_dens) ** 2 <= rad ** 2) & _between(d, tip, vt.top + 1.0)
    return body


def _compressed_band(vt: Vertebra, u, v, d) -> np.ndarray:
    """The sclerotic (denser) band under the lowered end plate of a wedge fracture."""
    top = vt.top + vt.wedge * np.clip((vt.v_body + vt.b_body - v) / (2 * vt.b_body), 0.0, 1.0)
    return _ellipse(u, v, 0.0, vt.v_body, vt.a_body, vt.b_body) & _between(d, top, top + 4.0)


def _atlas_mask(vt: Vertebra, u, v, d) -> np.ndarray:
    """C1: a ring (anterior and posterior arch), lateral masses, transverse processes."""
    au, t = np.abs(u), vt.lamina
    ring = (_ellipse(u, v, 0.0, vt.ring_v, vt.a_canal + t, vt.b_canal + t)
            & ~_ellipse(u, v, 0.0, vt.ring_v, vt.a_canal, vt.b_canal) & _between(d, vt.top, vt.bottom))
    masses = _ellipse(au, v, vt.a_canal - 0.5, vt.v_body, vt.a_body, vt.b_body) & _between(
        d, vt.top - 1.0, vt.bottom + 1.0)
    tps = (_between(au, vt.a_canal, vt.a_canal + t + vt.tp) & (np.abs(v - vt.v_body) < 2.8)
           & ~_ellipse(au, v, vt.a_canal + t + 3.0, vt.v_body, 2.2, 2.2)
           & _between(d, vt.top + 2.0, vt.bottom - 1.0))
    back = vt.ring_v + vt.b_canal
    tubercle = (au < 3.0) & _between(v, back, back + t + vt.spine) & _between(d, vt.top + 1.0, vt.bottom - 1.0)
    return ring | masses | tps | tubercle


def _vertebra_mask(vt: Vertebra, u, v, d) -> np.ndarray:
    """All voxels of one vertebra: body, pedicles/laminae, pillars, processes."""
    if vt.label == 1:
        return _atlas_mask(vt, u, v, d)
    au, t, h = np.abs(u), vt.lamina, vt.bottom - vt.top
    lift = 0.45 * np.clip(v - vt.b_canal, 0.0, None)  # posterior elements slope downwards
    arch_depth = (d >= vt.top + 0.1 * h + lift) & (d <= vt.bottom - 0.1 * h + lift)
    ring = (_ellipse(u, v, 0.0, 0.0, vt.a_canal + t, vt.b_canal + t)
            & ~_ellipse(u, v, 0.0, 0.0, vt.a_canal, vt.b_canal))
    spinous = (au < 0.55 * t) & _between(v, vt.b_canal, vt.b_canal + t + vt.spine)
    pillars = _ellipse(au, v, vt.a_canal + 0.5 * t, 0.5, 0.9 * t, 1.3 * t) & _between(d, vt.top, vt.bottom)
    v_tp = vt.v_body + 0.5 * vt.b_body
    tps = (_between(au, 0.6 * vt.a_body, vt.a_body + vt.tp) & (np.abs(v - v_tp) < 2.6)
           & _between(d, vt.top + 0.25 * h, vt.bottom - 0.25 * h))
    if vt.label <= 6:  # foramen transversarium of the vertebral artery
        tps &= ~_ellipse(au, v, vt.a_body + 0.45 * vt.tp, v_tp, 2.2, 2.2)
    return _body_mask(vt, u, v, d) | ((ring | spinous) & arch_depth) | pillars | tps


def _fracture_gap(vt: Vertebra, u, v, d, inside: np.ndarray) -> np.ndarray:
    """Voxels of vt that a fracture line replaces with soft tissue."""
    gap = np.zeros(inside.shape, bool)
    for p in vt.planes:
        near = (u - p.point[0]) ** 2 + (v - p.point[1]) ** 2 + (d - p.point[2]) ** 2 <= p.radius ** 2
        gap |= near & (np.abs(_plane_dist(p, u, v, d)) <= p.width / 2)
    return gap & inside


def _interp(d: np.ndarray, knots, values) -> np.ndarray:
    """np.interp kept in float32, so the (n, R, C) arithmetic it feeds stays float32."""
    return np.interp(d, knots, values).astype(np.float32)


def _depth_mask(d: np.ndarray, shape: tuple[int, ...], lo: float, hi: float, fn) -> np.ndarray:
    """(n, R, C) mask that is ``fn(k)`` on the slices k with depth in [lo, hi], False elsewhere.

    Most structures span a few slices of a chunk; evaluating them only there is
    what keeps a 128^3 study well under a second.
    """
    out = np.zeros(shape, bool)
    rows = np.nonzero((d.ravel() >= lo) & (d.ravel() <= hi))[0]
    if rows.size:
        k = slice(int(rows[0]), int(rows[-1]) + 1)
        out[k] = fn(k)
    return out


def _airway(an: Anatomy, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Airway centre v and half-axes at depths d: pharynx above, trachea below."""
    c3, c6, sb = an.vertebrae[2], an.vertebrae[5], an.skull_bottom
    k = c3.a_body / 8.5
    knots = [sb, (c3.top + c3.bottom) / 2, (c6.top + c6.bottom) / 2, an.depth]
    a = _interp(d, knots, [12.0 * k, 13.0 * k, 9.0 * k, 9.0 * k])
    b = _interp(d, knots, [8.0 * k, 7.0 * k, 9.0 * k, 9.0 * k])
    prevertebral = _interp(d, knots, [3.0, 4.0, 12.0, 14.0])
    return c3.v_body - c3.b_body - prevertebral - b, a, b


def _skull_base(an: Anatomy, u, v, d) -> np.ndarray:
    """Occipital bowl around the foramen magnum, clivus, condyles and mastoids."""
    au, sb = np.abs(u), an.skull_bottom
    c1 = an.vertebrae[0]
    head_a, head_b = an.neck[0, 0], an.neck[1, 0]
    q = np.sqrt((u / 15.0) ** 2 + ((v - 2.0) / 17.0) ** 2)  # 1 on the foramen magnum rim
    floor = sb - 3.0 - 0.5 * 15.0 * (q - 1.0)  # the posterior fossa floor rises away from the rim
    inside_head = _ellipse(u, v, 0.0, an.neck[2, 0], head_a - 7.0, head_b - 7.0)
    bowl = (q > 1.0) & _between(d, floor - 5.0, floor) & inside_head & (v > -12.0)
    front = -12.0 - np.minimum(v + 12.0, 0.0)  # mm anterior of the basion
    clivus = (au < 10.0) & (v < -12.0) & (v > -40.0) & _between(d, sb - 11.0 - front, sb - 4.0 - front)
    condyles = _ellipse(au, v, c1.a_canal - 0.5, c1.v_body, 5.0, 8.0) & _between(d, sb - 7.0, sb)
    mastoids = _ellipse(au, v, head_a - 18.0, 6.0, 7.0, 9.0)
    return bowl | clivus | condyles | mastoids


def _accessory_bones(an: Anatomy, u, v, d) -> list[tuple[int, np.ndarray]]:
    """Unlabelled bone: skull base, mandible, hyoid; each (id, (n, R, C) mask)."""
    c2, c3 = an.vertebrae[1:3]
    v_m, a_m, b_m = c2.v_body - 4.0, 4.4 * c2.a_body, 4.6 * c2.b_body

    def mandible(k):
        return (_ellipse(u[k], v[k], 0.0, v_m, a_m, b_m) & ~_ellipse(u[k], v[k], 0.0, v_m, a_m - 7.0, b_m - 7.0)
                & (v[k] < v_m + 4.0))

    def hyoid(k):
        v_air = _airway(an, d[k])[0]
        return (_ellipse(u[k], v[k], 0.0, v_air - 2.0, 16.0, 12.0)
                & ~_ellipse(u[k], v[k], 0.0, v_air - 2.0, 13.0, 9.0) & (v[k] < v_air - 5.0))

    return [(SKULL_ID, _depth_mask(d, u.shape, 0.0, an.skull_bottom + 8.0,
                                   lambda k: _skull_base(an, u[k], v[k], d[k]))),
            (MANDIBLE_ID, _depth_mask(d, u.shape, c2.top - 3.0, c3.top + 3.0, mandible)),
            (HYOID_ID, _depth_mask(d, u.shape, c3.bottom, c3.bottom + 4.0, hyoid))]


def _canal(an: Anatomy, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canal half-axes at depths d (C1's numbers size its ring, so start at C2)."""
    levels = an.vertebrae[1:]
    mids = [(vt.top + vt.bottom) / 2 for vt in levels]
    return (_interp(d, mids, [vt.a_canal for vt in levels]),
            _interp(d, mids, [vt.b_canal for vt in levels]))


def _soft_tissue(an: Anatomy, un, vn, u, v, d) -> np.ndarray:
    """HU of everything but bone: skin fat, muscle, fat planes, thyroid, discs, airway, canal."""
    a_n, b_n, v_n = (_interp(d, an.neck_knots, row) for row in an.neck)
    hu = np.full(u.shape, AIR, np.float32)
    hu[_ellipse(un, vn, 0.0, v_n, a_n, b_n)] = an.hu["fat"]
    fat_mm = an.hu["fat_mm"]
    muscle = _ellipse(un, vn, 0.0, v_n, a_n - fat_mm, b_n - fat_mm)
    hu[muscle] = an.hu["muscle"]
    fat = np.zeros(u.shape, bool)
    for bu, bv, ba, bb, d0, d1 in an.fat_blobs:
        fat |= _depth_mask(d, u.shape, d0, d1, lambda k: _ellipse(u[k], v[k], bu, bv, ba, bb))
    hu[muscle & fat] = an.hu["fat"]
    v_air, a_air, b_air = _airway(an, d)
    c6, t1 = an.vertebrae[5], an.vertebrae[7]
    thyroid = _depth_mask(d, u.shape, c6.top - 5.0, t1.top + 8.0, lambda k: _ellipse(
        np.abs(u[k]), v[k], a_air[k] + 7.0, v_air[k] + 2.0, 6.0, 9.0))
    hu[muscle & thyroid] = THYROID
    for upper, lower in zip(an.vertebrae[1:-1], an.vertebrae[2:]):
        disc = _depth_mask(d, u.shape, upper.bottom, lower.top, lambda k: _ellipse(
            u[k], v[k], 0.0, (upper.v_body + lower.v_body) / 2, (upper.a_body + lower.a_body) / 2,
            (upper.b_body + lower.b_body) / 2))
        hu[disc] = DISC
    hu[muscle & _ellipse(u, v, 0.0, v_air, a_air, b_air)] = AIR
    a_c, b_c = _canal(an, d)
    hu[_ellipse(u, v, 0.0, 0.0, a_c, b_c)] = CSF
    hu[_ellipse(u, v, 0.0, 0.5, 0.55 * a_c, 0.6 * b_c)] = CORD
    return hu


def _coords(an: Anatomy, d: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Neck-frame (un, vn) and spine-frame (u, v) coordinates, (n, size, size), for depths d (n, 1, 1)."""
    grid = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * an.pixel  # mm from the image centre
    dx = grid[None, None, :] - (an.offset[0] + an.drift[0] * d)
    dy = grid[None, :, None] - (an.offset[1] + an.drift[1] * d)
    cos, sin = math.cos(an.theta), math.sin(an.theta)
    un, vn = cos * dx + sin * dy, cos * dy - sin * dx
    c1, t1 = an.vertebrae[0], an.vertebrae[7]
    bend = np.sin(np.pi * np.clip((d - c1.top) / (t1.top - c1.top), 0.0, 1.0))
    return un, vn, un - an.curve[1] * bend, vn + an.curve[0] * bend  # lordosis: mid-neck forwards


def _extras(an: Anatomy, u, v, d, tissue: np.ndarray, ids: np.ndarray) -> None:
    """Contrast vessels (into ``tissue``) and metal objects (into ``ids``) of one chunk, in place."""
    for vu, vv, radius, value in an.vessels:
        tissue[_ellipse(u, v, vu, vv, radius, radius) & (tissue > -200)] = value
    for mu, mv, md, radius, _ in an.metal:
        ids[(u - mu) ** 2 + (v - mv) ** 2 + (d - md) ** 2 <= radius ** 2] = METAL_ID


def _render_geometry(an: Anatomy, size: int, n_slices: int, dz: float) -> tuple[np.ndarray, ...]:
    """Soft-tissue HU, bone ids, fracture-gap labels and compressed-band flags, each (S, R, C)."""
    shape = (n_slices, size, size)
    tissue, ids = np.empty(shape, np.float32), np.zeros(shape, np.uint8)
    gap, dense = np.zeros(shape, np.uint8), np.zeros(shape, bool)
    for s0 in range(0, n_slices, CHUNK):
        s1 = min(s0 + CHUNK, n_slices)
        d = (an.top + (np.arange(s0, s1) + 0.5) * dz).astype(np.float32)[:, None, None]
        un, vn, u, v = _coords(an, d, size)
        tissue[s0:s1] = _soft_tissue(an, un, vn, u, v, d)
        for bone_id, mask in _accessory_bones(an, u, v, d):
            ids[s0:s1][mask] = bone_id
        _extras(an, u, v, d, tissue[s0:s1], ids[s0:s1])
        for vt in an.vertebrae:
            lo, hi = vt.extent()
            hit = np.nonzero((d.ravel() >= lo) & (d.ravel() <= hi))[0]
            if hit.size == 0:
                continue
            sl = slice(s0 + hit[0], s0 + hit[-1] + 1)
            cu, cv, cd = u[hit[0]:hit[-1] + 1], v[hit[0]:hit[-1] + 1], d[hit[0]:hit[-1] + 1]
            mask = _vertebra_mask(vt, cu, cv, cd)
            ids[sl][mask] = vt.label
            if vt.planes:
                gap[sl][_fracture_gap(vt, cu, cv, cd, mask)] = vt.label
            if vt.wedge:
                dense[sl] |= _compressed_band(vt, cu, cv, cd) & mask
    return tissue, ids, gap, dense


def _ball(radii: tuple[int, int, int]) -> np.ndarray:
    """Ellipsoidal structuring element with the given voxel radii."""
    axes = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    return sum((a / max(r, 1)) ** 2 for a, r in zip(axes, radii)) <= 1.0


def _intensities(rng: np.random.Generator, an: Anatomy, tissue: np.ndarray, ids: np.ndarray,
                 gap: np.ndarray, dense: np.ndarray, dz: float) -> np.ndarray:
    """HU (S, R, C) int16: cancellous bone inside a cortical shell, breaks, blur and noise."""
    bone = ids > 0
    radii = (max(1, round(1.4 / dz)), max(1, round(1.4 / an.pixel)), max(1, round(1.4 / an.pixel)))
    inner = ndimage.binary_erosion(bone, _ball(radii), border_value=1)
    cancellous, cortical = np.zeros(256, np.float32), np.zeros(256, np.float32)
    for vt in an.vertebrae:
        cancellous[vt.label], cortical[vt.label] = an.hu[f"canc{vt.label}"], an.hu["cortex"]
    cancellous[[SKULL_ID, MANDIBLE_ID, HYOID_ID]] = 0.45 * an.hu["skull"]
    cortical[[SKULL_ID, MANDIBLE_ID, HYOID_ID]] = an.hu["skull"]
    if len(an.metal):
        cancellous[METAL_ID] = cortical[METAL_ID] = an.metal[0, 4]
    hu = tissue
    # trabecular texture: white noise that the blur below turns into a fine grain
    hu[bone] = cancellous[ids[bone]] + rng.normal(0.0, 45.0, int(bone.sum())).astype(np.float32)
    cortex = bone & ~inner
    hu[cortex] = cortical[ids[cortex]]
    hu[dense & inner] += 300.0
    hu[gap > 0] = HEMATOMA
    hu = ndimage.gaussian_filter(hu, sigma=0.5)  # partial-volume softening of every edge
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(an.hu["noise"])
    if an.streaks:
        _add_streaks(rng, an, hu, ids)
    if an.hu.get("scale", 1.0) != 1.0 or an.hu.get("offset", 0.0) != 0.0:  # another scanner's calibration
        hu = hu * np.float32(an.hu["scale"]) + np.float32(an.hu["offset"])
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def _add_streaks(rng: np.random.Generator, an: Anatomy, hu: np.ndarray, ids: np.ndarray) -> None:
    """Beam-hardening-like streaks, in place: rays around metal, a dark band between the shoulders."""
    size = hu.shape[1]
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    shoulders = an.vertebrae[6].top  # below C7 the shoulders harden the beam across the neck
    for s in range(hu.shape[0]):
        metal = np.nonzero(ids[s] == METAL_ID)
        if metal[0].size:
            cy, cx = metal[0].mean(), metal[1].mean()
            angle = np.arctan2(yy - cy, xx - cx)
            radius = np.hypot(yy - cy, xx - cx) * an.pixel
            rays = np.cos(int(rng.integers(12, 30)) * angle + rng.uniform(0, 2 * np.pi))
            hu[s] += 2.5 * an.streaks * rays * np.exp(-radius / 40.0)
        depth = an.top + (s + 0.5) * (an.depth - an.top) / hu.shape[0]
        if depth > shoulders:
            centre = size / 2 + an.offset[1] / an.pixel
            band = np.exp(-0.5 * ((yy - centre) * an.pixel / 6.0) ** 2)
            hu[s] -= an.streaks * float(rng.uniform(0.5, 1.2)) * band


def _fracture_boxes(gap: np.ndarray, pad: int = 2) -> list[tuple[int, int, int, int, int, int]]:
    """(slice, x, y, width, height, vertebra) around each slice's visible gap voxels."""
    boxes = []
    size_r, size_c = gap.shape[1:]
    for s in np.unique(np.nonzero(gap)[0]):
        for label in np.unique(gap[s][gap[s] > 0]):
            rows, cols = np.nonzero(gap[s] == label)
            if rows.size < 4:  # a plane that only grazes this slice
                continue
            x0, y0 = max(int(cols.min()) - pad, 0), max(int(rows.min()) - pad, 0)
            x1, y1 = min(int(cols.max()) + pad + 1, size_c), min(int(rows.max()) + pad + 1, size_r)
            boxes.append((int(s), x0, y0, x1 - x0, y1 - y0, int(label)))
    return boxes


def render_phantom(rng: np.random.Generator, size: int, n_slices: int | None, fractured: Sequence[int],
                   variety: Variety = PRESETS["easy"], vrng: np.random.Generator | None = None) -> Phantom:
    """Draw and render one neck CT.

    size: rows = cols of each slice; n_slices: slices over the scanned range (None: from
    the variety's slice spacing); fractured: 7 flags for C1..C7; variety and vrng: how
    this study differs (see ``tooling.anatomy.Variety``). Returns a Phantom with
    (slices, size, size) volumes.
    """
    if len(fractured) != 7:
        raise ValueError(f"fractured needs 7 flags (C1..C7), got {len(fractured)}")
    an = sample_anatomy(rng, size, fractured, variety, vrng)
    extent = an.depth - an.top
    if n_slices is None:
        if an.slice_mm is None:
            raise ValueError("n_slices is needed when the variety does not set slice_mm")
        n_slices = max(16, int(round(extent / an.slice_mm)))
    dz = round(extent / n_slices, 5)
    tissue, ids, gap, dense = _render_geometry(an, size, n_slices, dz)
    hu = _intensities(rng, an, tissue, ids, gap, dense, dz)
    labels = np.where(ids <= len(LEVELS), ids, 0).astype(np.uint8)
    x0 = an.centre[0] + (0.5 - size / 2) * an.pixel
    y0 = an.centre[1] + (0.5 - size / 2) * an.pixel
    z_top = round(float(rng.uniform(-80.0, 40.0)), 3)
    return Phantom(hu, labels, (dz, an.pixel, an.pixel), (x0, y0, z_top), _fracture_boxes(gap), dict(an.kinds))
