"""Random neck anatomy for the phantom, and the ways studies differ (``Variety``).

Geometry lives in a spine-local frame, in millimetres: ``u`` runs to the
patient's left, ``v`` to the back (the spinal canal centre is ``u = v = 0``)
and ``d`` is the depth below a reference near the top of the head. A study
scans depths ``top..bottom``.

``sample_anatomy`` draws one neck: vertebra sizes, the neck outline, the field
of view, pose, fractures and tissue intensities. What is drawn, and from which
range, is set by a :class:`Variety`; every range is documented on its field.
``PRESETS["easy"]`` reproduces the original generator bit for bit (its draws
come from the study's main random stream; every variety range is drawn from a
second stream, so adding a knob never changes what the easy preset makes).
``PRESETS["varied"]`` spans what real neck CTs do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

# Per level: body height range, body half-width / half-depth, canal half-width /
# half-depth, spinous process length, transverse process length (mm, adult
# proportions). C1 has no body: its "body" numbers size the lateral masses and
# its canal numbers the inside of the ring.
LEVELS = (  # label, h_lo, h_hi, a_body, b_body, a_canal, b_canal, spine, tp
    (1, 9.0, 11.0, 5.5, 8.0, 14.0, 15.0, 5.0, 13.0),
    (2, 15.0, 18.0, 8.5, 7.5, 11.5, 8.0, 17.0, 7.0),
    (3, 12.5, 14.5, 8.5, 7.5, 11.5, 7.5, 12.0, 8.0),
    (4, 12.5, 14.5, 8.8, 7.6, 11.5, 7.5, 12.0, 8.0),
    (5, 13.0, 15.0, 9.2, 7.8, 11.5, 7.5, 13.0, 8.5),
    (6, 13.0, 15.0, 9.8, 8.0, 11.0, 7.5, 17.0, 9.0),
    (7, 14.0, 16.0, 10.8, 8.6, 10.5, 7.2, 24.0, 11.0),
    (8, 16.0, 18.0, 12.0, 10.0, 9.0, 7.0, 27.0, 15.0),
    (9, 17.0, 19.0, 12.6, 11.0, 8.0, 7.0, 27.0, 15.0),
    (10, 18.0, 20.0, 13.0, 12.0, 8.0, 7.0, 26.0, 15.0),
)
FRACTURE_KINDS = ("line", "wedge", "crack", "displaced", "posterior")

Range = Optional[tuple[float, float]]


@dataclass(frozen=True)
class Variety:
    """How one study differs from the next: each range is drawn uniformly per study.

    ``None`` keeps the original generator's own draw for that property. Sizes
    are physical, so they mean the same at any image size; where a property is
    bounded by the image size (thin fractures), it is kept visible at the
    crops' resolution.
    """

    name: str = "easy"
    fill: Range = None           # head width / field of view: 1/3 (a wide FOV; at 512 px, 0.8 mm pixels) to
                                 # 1 (the head fills the image; 0.25 mm pixels). Original: 0.82-0.95.
    slice_mm: Range = None       # slice spacing in mm; None: the dataset's slice count decides (0.8-1.2 x size)
    top_mm: Range = None         # scan top below the top of C1, mm: negative = skull base in view,
                                 # 0..+8 = cut through C1. Original: 15-24 mm above C1.
    bottom_level: Range = None   # scan bottom as a level: 6.5 = half-way down C7 (cut through C7), 7 = top of T1,
                                 # 10 = bottom of T3. Original: within T2. A cut never hides a fracture.
    rotation_deg: Range = None   # in-plane rotation of the patient. Original: +-7 degrees.
    off_centre: Range = None     # patient shift from the image centre, as a fraction of the FOV (both axes).
    lordosis_mm: Range = None    # mid-neck forward bow; negative = flexion (kyphotic). Original: 2-7 mm.
    tilt: Range = None           # lean of the column, mm per mm of depth (0.15 ~ 8.5 degrees). Original: +-0.03.
    noise_hu: Range = None       # image noise sd. Original: 15-25 HU.
    hu_scale: Range = None       # HU calibration: HU' = HU * scale + offset (soft tissue and bone alike)
    hu_offset: Range = None
    streak_p: float = 0.0        # probability of beam-hardening streaks (shoulder level, around metal)
    metal_p: float = 0.0         # probability of metal-like objects (dental fillings, clips; 2,500-3,071 HU)
    vessels_p: float = 0.0       # probability of contrast-filled neck vessels (150-350 HU tubes)
    kinds: Optional[dict[str, float]] = None  # fracture kind weights (C2..C7; C1 always ring breaks).
                                              # None: the original 35 % wedge, 65 % line.


_VARIED = dict(
    slice_mm=(0.5, 2.0), top_mm=(-40.0, 6.0), bottom_level=(6.5, 10.0), rotation_deg=(-25.0, 25.0),
    off_centre=(-0.12, 0.12), lordosis_mm=(-6.0, 12.0), tilt=(-0.12, 0.12), noise_hu=(5.0, 60.0),
    hu_scale=(0.9, 1.1), hu_offset=(-40.0, 40.0), streak_p=0.4, metal_p=0.3, vessels_p=0.4,
    kinds={"line": 0.25, "wedge": 0.2, "crack": 0.2, "displaced": 0.15, "posterior": 0.2})
# A real CT has 512 pixels across, so even a field of view three times the head leaves a vertebral
# body ~20 pixels wide. The CPU-sized synthetic images (96-128 px) cannot: at a fill of 1/3 a body
# would be 4 pixels wide, coarser than any scanner. So "varied" keeps the head filling half the
# image or more, and "wide-fov" spans the rest of the range (a third to two thirds), meant for
# images of 192 px or more.
PRESETS: dict[str, Variety] = {
    "easy": Variety(),
    "varied": Variety(name="varied", fill=(0.5, 1.0), **_VARIED),
    "wide-fov": Variety(name="wide-fov", fill=(0.33, 0.66), **_VARIED),
}


@dataclass(frozen=True)
class Plane:
    """A fracture gap: voxels within width/2 of the plane and radius of point."""

    point: tuple[float, float, float]  # (u, v, d) mm
    normal: tuple[float, float, float]  # unit vector in (u, v, d)
    radius: float
    width: float


@dataclass
class Vertebra:
    """One vertebra; depths are of its body (C1: of its ring)."""

    label: int
    top: float
    bottom: float
    a_body: float
    b_body: float
    v_body: float
    a_canal: float
    b_canal: float
    lamina: float
    spine: float
    tp: float
    ring_v: float = 0.0  # C1: centre of the ring
    dens: tuple[float, float, float] | None = None  # C2: (v, radius, tip depth)
    planes: list[Plane] = field(default_factory=list)
    shift: tuple[float, float] = (0.0, 0.0)  # body fragment beyond planes[0], mm
    wedge: float = 0.0  # anterior height lost to compression, mm

    def extent(self) -> tuple[float, float]:
        """Depth range any part of this vertebra can occupy."""
        top = self.dens[2] if self.dens else self.top
        return top - 3.0, self.bottom + 0.45 * (self.lamina + self.spine) + 3.0


@dataclass
class Anatomy:
    """Everything random about one study except the noise."""

    vertebrae: list[Vertebra]
    skull_bottom: float
    depth: float  # bottom of the scanned range, mm
    pixel: float  # in-plane spacing, mm
    fov: float
    theta: float  # in-plane rotation, radians
    centre: tuple[float, float]  # patient (x, y) of the image centre
    offset: tuple[float, float]  # spine line at the top, from the image centre, mm
    drift: tuple[float, float]  # mm of centre drift per mm of depth
    curve: tuple[float, float]  # lordosis (anterior) and lateral bow amplitudes, mm
    neck_knots: np.ndarray  # (K,) depths; the rows below are the outline at each
    neck: np.ndarray  # (3, K): half-width, half-depth, centre v
    fat_blobs: np.ndarray  # (N, 6): u, v, a, b, d0, d1
    hu: dict[str, float]
    kinds: dict[int, str] = field(default_factory=dict)  # fractured label -> kind
    top: float = 0.0  # top of the scanned range, mm
    slice_mm: float | None = None  # slice spacing, when the variety sets it
    metal: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # (N, 5): u, v, d, radius, HU
    vessels: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # (N, 4): u, v, radius, HU
    streaks: float = 0.0  # beam-hardening amplitude, HU (0: none)


def _unit(x: Sequence[float]) -> tuple[float, float, float]:
    n = math.sqrt(sum(c * c for c in x))
    return tuple(float(c / n) for c in x)  # type: ignore[return-value]


def _sample_vertebrae(rng: np.random.Generator, g: float, skull_bottom: float) -> list[Vertebra]:
    """Stack the levels from C1 down with realistic heights and disc gaps."""
    out: list[Vertebra] = []
    depth = skull_bottom + 2.0 * g  # atlanto-occipital joint
    dens_r, v_dens = 5.0 * g, -13.8 * g  # the dens stands over the back half of the C2 body
    for label, h_lo, h_hi, a_b, b_b, a_c, b_c, spine, tp in LEVELS:
        h = rng.uniform(h_lo, h_hi) * g
        s = g * rng.uniform(0.94, 1.06)
        a_c, b_c, lam = a_c * s, b_c * s, rng.uniform(4.0, 5.0) * g
        vt = Vertebra(label, depth, depth + h, a_b * s, b_b * s, -(b_c + 0.8 * g + b_b * s),
                      a_c, b_c, lam, spine * s * rng.uniform(0.9, 1.1), tp * s)
        if label == 1:
            front, back = v_dens - dens_r - 1.5 * g, 9.0 * g
            vt.ring_v, vt.b_canal = (front + back) / 2, (back - front) / 2
            vt.v_body = vt.ring_v - 0.2 * vt.b_canal  # lateral masses
            depth = vt.bottom + 2.0 * g
        else:
            if label == 2:
                vt.dens = (v_dens, dens_r, out[0].top + 1.0 * g)
            depth = vt.bottom + rng.uniform(4.0, 5.5) * g * (1.1 if label >= 7 else 1.0)
        out.append(vt)
    return out


def _ring_breaks(rng: np.random.Generator, vt: Vertebra, width: float) -> str:
    """C1: one to three breaks through the ring."""
    mid = (vt.top + vt.bottom) / 2
    a_mid, b_mid = vt.a_canal + vt.lamina / 2, vt.b_canal + vt.lamina / 2
    for alpha in rng.choice([-0.5, 0.5], size=int(rng.choice([1, 2, 2, 3]))) * math.pi:
        alpha += rng.uniform(-0.6, 0.6)
        point = (a_mid * math.cos(alpha), vt.ring_v + b_mid * math.sin(alpha), mid)
        normal = _unit((-a_mid * math.sin(alpha), b_mid * math.cos(alpha), rng.uniform(-0.2, 0.2)))
        vt.planes.append(Plane(point, normal, vt.lamina + 4.0, width * 1.2))
    return "ring"


def _body_planes(rng: np.random.Generator, vt: Vertebra, n_planes: int, width: float) -> None:
    """Fracture planes through the body (or C2's dens base)."""
    h = vt.bottom - vt.top
    for _ in range(n_planes):
        phi = rng.uniform(0, math.pi)
        normal = _unit((math.cos(phi), math.sin(phi), rng.uniform(-0.3, 0.3)))
        if vt.dens is not None and rng.random() < 0.35:  # through the dens base
            point = (0.0, vt.dens[0], vt.top - rng.uniform(1.0, 4.0))
            radius = vt.dens[1] + 4.0
        else:
            point = (rng.uniform(-0.4, 0.4) * vt.a_body, vt.v_body + rng.uniform(-0.4, 0.4) * vt.b_body,
                     vt.top + rng.uniform(0.25, 0.75) * h)
            radius = 1.5 * max(vt.a_body, vt.b_body)
        vt.planes.append(Plane(point, normal, radius, width))


def _displace(rng: np.random.Generator, vt: Vertebra, low: float, high: float) -> None:
    """Move the body fragment beyond the first plane by low..high mm along its normal."""
    n = vt.planes[0].normal
    step = rng.uniform(low, high) / max(math.hypot(n[0], n[1]), 1e-6)
    vt.shift = (n[0] * step, n[1] * step)


def _posterior_break(rng: np.random.Generator, vt: Vertebra, width: float) -> None:
    """A break through a lamina, pedicle or the spinous process."""
    side = rng.choice([-1.0, 1.0])
    h = vt.bottom - vt.top
    if rng.random() < 0.4:  # spinous process
        point = (0.0, vt.b_canal + vt.lamina + rng.uniform(0.2, 0.6) * vt.spine, vt.top + 0.5 * h + 0.3 * vt.spine)
        normal = _unit((rng.uniform(-0.3, 0.3), 1.0, rng.uniform(-0.3, 0.3)))
    else:  # lamina or pedicle
        angle = rng.uniform(0.1, 0.45) * math.pi
        a, b = vt.a_canal + vt.lamina / 2, vt.b_canal + vt.lamina / 2
        point = (side * a * math.cos(angle), b * math.sin(angle), vt.top + 0.5 * h)
        normal = _unit((-side * a * math.sin(angle), b * math.cos(angle), rng.uniform(-0.2, 0.2)))
    vt.planes.append(Plane(point, normal, vt.lamina + 4.0, width))


def _add_fracture(rng: np.random.Generator, vt: Vertebra, width: float, kind: str | None = None) -> str:
    """Draw a visible fracture into vt and return its kind.

    C1: ring breaks. C2..C7: ``line`` (1-2 planes, 0.8-2 mm displacement), ``wedge``
    (anterior compression), ``crack`` (a thin plane, no displacement), ``displaced``
    (a line with 2.5-5 mm displacement), ``posterior`` (lamina, pedicle or spinous
    process). ``kind`` None draws line or wedge as the original generator did.
    """
    if vt.label == 1:
        return _ring_breaks(rng, vt, width)
    if kind is None:
        kind = "wedge" if rng.random() < 0.35 else "line"
    if kind == "posterior":
        _posterior_break(rng, vt, width)
        return kind
    n_planes = 1 if kind in ("wedge", "crack", "displaced") else int(rng.choice([1, 1, 2]))
    _body_planes(rng, vt, n_planes, width * (0.45 if kind == "crack" else 1.0))
    if kind == "wedge":
        vt.wedge = rng.uniform(0.3, 0.45) * (vt.bottom - vt.top)
    elif kind == "line":
        _displace(rng, vt, 0.8, 2.0)
    elif kind == "displaced":
        _displace(rng, vt, 2.5, 5.0)
    return kind


def _level_depth(vertebrae: list[Vertebra], level: float) -> float:
    """Depth of a continuous level: 6.0 = top of C7, 6.5 = half-way down C7's body, 7.0 = top of T1."""
    index = int(level)
    if index >= len(vertebrae):
        return vertebrae[-1].bottom
    vt = vertebrae[index]
    return vt.top + (level - index) * (vt.bottom - vt.top)


def _draw(vrng: np.random.Generator, span: Range, default: float) -> float:
    return default if span is None else float(vrng.uniform(*span))


def _extras(vrng: np.random.Generator, variety: Variety, an: Anatomy) -> None:
    """Metal, contrast vessels and streaks, each with its variety probability."""
    c2, c4 = an.vertebrae[1], an.vertebrae[3]
    if vrng.random() < variety.metal_p:  # fillings in the teeth (in front of C1-C2) or surgical clips
        n = int(vrng.integers(1, 5))
        an.metal = np.column_stack([vrng.uniform(-25, 25, n), vrng.uniform(-75, -45, n),
                                    vrng.uniform(an.vertebrae[0].top - 5, c2.bottom, n), vrng.uniform(1.0, 3.0, n),
                                    vrng.uniform(2500, 3071, n)])
    if vrng.random() < variety.vessels_p:  # carotids beside the airway, contrast-enhanced
        side = c4.a_body + vrng.uniform(14, 24)
        v = c4.v_body - vrng.uniform(2, 10)
        hu = vrng.uniform(150, 350)
        an.vessels = np.array([[-side, v, vrng.uniform(2.5, 4.0), hu], [side, v, vrng.uniform(2.5, 4.0), hu]])
    if vrng.random() < variety.streak_p:
        an.streaks = float(vrng.uniform(40, 160))


def sample_anatomy(rng: np.random.Generator, size: int, fractured: Sequence[int],
                   variety: Variety = PRESETS["easy"], vrng: np.random.Generator | None = None) -> Anatomy:
    """Draw one neck; ``fractured`` is 7 flags for C1..C7; ``vrng`` draws the variety ranges."""
    vrng = vrng if vrng is not None else np.random.default_rng(0)
    g = rng.uniform(0.9, 1.1)
    skull_bottom = rng.uniform(14.0, 22.0) * g
    vertebrae = _sample_vertebrae(rng, g, skull_bottom)
    t2 = vertebrae[8]
    depth = t2.top + rng.uniform(0.5, 1.15) * (t2.bottom - t2.top)
    head_a, neck_a, head_b, neck_b = (rng.uniform(66, 74) * g, rng.uniform(52, 62) * g,
                                      rng.uniform(64, 72) * g, rng.uniform(53, 60) * g)
    c2, c6 = vertebrae[1], vertebrae[5]
    knots = np.array([0.0, skull_bottom, (c2.top + c2.bottom) / 2, (c6.top + c6.bottom) / 2, depth])
    neck = np.array([[head_a, head_a * 0.95, neck_a, neck_a * 1.04, neck_a * rng.uniform(1.2, 1.4)],
                     [head_b, head_b * 0.95, neck_b, neck_b, neck_b * 1.1],
                     [-14.0 * g, -12.0 * g, -10.0 * g, -8.0 * g, -4.0 * g]])
    drift = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))
    fov = 2 * (head_a + 6.0 + 0.03 * depth) * rng.uniform(1.02, 1.12)
    if variety.fill is not None:
        fov = 2 * head_a / vrng.uniform(*variety.fill)
    pixel = round(fov / size, 6)
    width = max(4.0, 2.8 * pixel)  # fracture gaps span ~3 pixels at 128 px, so 64 px crops still show them
    kinds = {}
    for vt in vertebrae[:7]:
        if fractured[vt.label - 1]:
            kind = None if variety.kinds is None else str(vrng.choice(list(variety.kinds), p=_weights(variety.kinds)))
            kinds[vt.label] = _add_fracture(rng, vt, width, kind)
    blobs = np.column_stack([rng.uniform(-40, 40, 8) * g, rng.uniform(-45, 40, 8) * g,
                             rng.uniform(2.5, 6.0, 8) * g, rng.uniform(2.5, 6.0, 8) * g,
                             rng.uniform(0, depth, 8), rng.uniform(20, 60, 8)])
    blobs[:, 5] += blobs[:, 4]
    hu = {"fat": rng.uniform(-110, -80), "muscle": rng.uniform(35, 60), "cortex": rng.uniform(750, 1000),
          "skull": rng.uniform(1100, 1400), "noise": rng.uniform(15, 25), "fat_mm": rng.uniform(4, 9) * g}
    hu.update({f"canc{vt.label}": rng.uniform(190, 310) for vt in vertebrae})
    an = Anatomy(vertebrae=vertebrae, skull_bottom=skull_bottom, depth=depth, pixel=pixel, fov=pixel * size,
                 theta=rng.uniform(-0.12, 0.12), centre=(rng.uniform(-10, 10), rng.uniform(-25, 5)),
                 offset=(rng.uniform(-4, 4), rng.uniform(8, 16)), drift=drift,
                 curve=(rng.uniform(2.0, 7.0) * g, rng.uniform(-2.0, 2.0)), neck_knots=knots, neck=neck,
                 fat_blobs=blobs, hu=hu, kinds=kinds)
    _apply_variety(vrng, variety, an)
    return an


def _weights(kinds: dict[str, float]) -> np.ndarray:
    unknown = set(kinds) - set(FRACTURE_KINDS)
    if unknown:
        raise ValueError(f"unknown fracture kinds {sorted(unknown)}; known: {FRACTURE_KINDS}")
    w = np.asarray(list(kinds.values()), float)
    return w / w.sum()


def _apply_variety(vrng: np.random.Generator, variety: Variety, an: Anatomy) -> None:
    """Replace the original draws by the variety's ranges, where it sets them."""
    c1 = an.vertebrae[0]
    if variety.top_mm is not None:  # a cut through C1 never hides a C1 fracture
        low, high = variety.top_mm
        an.top = c1.top + float(vrng.uniform(low, min(high, -2.0) if 1 in an.kinds else high))
    if variety.bottom_level is not None:  # nor a cut through C7 a C7 fracture
        low, high = variety.bottom_level
        an.depth = _level_depth(an.vertebrae, float(vrng.uniform(max(low, 7.0) if 7 in an.kinds else low, high)))
    if variety.slice_mm is not None:
        an.slice_mm = float(vrng.uniform(*variety.slice_mm))
    an.theta = math.radians(_draw(vrng, variety.rotation_deg, math.degrees(an.theta)))
    if variety.off_centre is not None:
        shift = vrng.uniform(*variety.off_centre, size=2) * an.fov
        an.offset = (an.offset[0] + float(shift[0]), an.offset[1] + float(shift[1]))
    an.curve = (_draw(vrng, variety.lordosis_mm, an.curve[0]), an.curve[1])
    if variety.tilt is not None:
        an.drift = tuple(float(x) for x in vrng.uniform(*variety.tilt, size=2))  # type: ignore[assignment]
    an.hu["noise"] = _draw(vrng, variety.noise_hu, an.hu["noise"])
    an.hu["scale"] = _draw(vrng, variety.hu_scale, 1.0)
    an.hu["offset"] = _draw(vrng, variety.hu_offset, 0.0)
    _extras(vrng, variety, an)
