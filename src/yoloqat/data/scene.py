"""One synthetic image: background, clutter, shapes drawn over each other, and their labels.

Labels are the tight box of the *visible* part of each shape, measured from its anti-aliased
coverage mask after every later object has been drawn over it; shapes with less than
``MIN_VISIBLE`` of their area visible (hidden by others or cut by the border) get no label.

Everything ``difficulty`` controls is in :class:`Knobs`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .shapes import BUILDERS, MAX_ASPECT, SHAPES, Ring

SUPERSAMPLE = 2  # masks are drawn at 2x and averaged: soft edges, sub-pixel accurate coverage
MIN_VISIBLE = 0.4  # objects more than 60 % hidden are not labelled
NEGATIVE_FRACTION = 0.07
MAX_OBJECTS = 8
MIN_SIZE, SMALL_MAX, MAX_SIZE = 0.06, 0.16, 0.7  # object extent as a fraction of imgsz


@dataclass
class _Object:
    cls: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the coverage crop, in image pixels
    full_area: float  # coverage of the whole shape, including any part outside the image
    visible: np.ndarray  # coverage within `box` still visible after later objects


@dataclass(frozen=True)
class Knobs:
    """Everything ``difficulty`` controls, so its effect is visible in one place."""

    p_small: float
    p_occlude: float
    min_contrast: float
    clutter: float

    @classmethod
    def from_difficulty(cls, d: float) -> Knobs:
        return cls(
            p_small=min(0.6, 0.3 * d),
            p_occlude=min(0.8, 0.3 * d),
            min_contrast=90.0 / (1.0 + d),
            clutter=d,
        )


def _rasterize(rings: list[Ring]) -> tuple[np.ndarray, int, int]:
    """Coverage in [0, 1] of the whole shape on its own canvas, plus the canvas' top-left."""
    pts = np.concatenate([r for r, _ in rings])
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 1
    w, h = int(x1 - x0), int(y1 - y0)
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for ring, adds in rings:
        # -0.5: PIL fills pixels whose centres are inside, so shift centres onto the geometry
        local = (ring - (x0, y0)) * SUPERSAMPLE - 0.5
        draw.polygon([(float(x), float(y)) for x, y in local], fill=255 if adds else 0)
    cov = np.asarray(canvas, dtype=np.float32).reshape(h, SUPERSAMPLE, w, SUPERSAMPLE)
    return cov.mean(axis=(1, 3)) / 255.0, int(x0), int(y0)


def _occlude(obj: _Object, alpha: np.ndarray, x0: int, y0: int) -> None:
    """Reduce ``obj``'s visible coverage where a later shape (``alpha`` at x0, y0) covers it."""
    ox0, oy0, ox1, oy1 = obj.box
    ix0, iy0 = max(ox0, x0), max(oy0, y0)
    ix1, iy1 = min(ox1, x0 + alpha.shape[1]), min(oy1, y0 + alpha.shape[0])
    if ix1 > ix0 and iy1 > iy0:
        cover = alpha[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        obj.visible[iy0 - oy0 : iy1 - oy0, ix0 - ox0 : ix1 - ox0] *= 1.0 - cover


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row/column coordinates, cached: every background and texture needs them."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _texture(rng: np.random.Generator, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    """Fill for one object: solid, gradient, stripes or noisy, so texture is no class cue."""
    kind = rng.choice(4, p=(0.45, 0.25, 0.15, 0.15))
    if kind == 0:
        return np.broadcast_to(colour, (h, w, 3))
    other = np.clip(colour + rng.uniform(-70.0, 70.0, 3), 0.0, 255.0)
    yy, xx = _grid(h, w)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 1:
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == 2:
        t = (np.sin(proj * 2.0 * math.pi / rng.uniform(3.0, 8.0)) > 0).astype(np.float32)
    else:
        return colour + rng.normal(0.0, 18.0, (h, w, 3)).astype(np.float32)
    return colour + t[..., None] * (other - colour)


def _background(rng: np.random.Generator, n: int, clutter: float) -> np.ndarray:
    yy, xx = _grid(n, n)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    # float32 throughout: half the memory traffic of float64 on the per-pixel maths
    c1, c2 = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    bg = c1 + t[..., None] * (c2 - c1)
    if rng.random() < min(1.0, 0.5 + 0.4 * clutter):
        # Low-frequency colour blobs: a coarse random grid upsampled, i.e. camouflage patches.
        g = int(rng.integers(3, 9))
        coarse = rng.integers(0, 256, (g, g, 3), dtype=np.uint8)
        blobs = Image.fromarray(coarse).resize((n, n), Image.Resampling.BICUBIC)
        amp = rng.uniform(15.0, 45.0) * clutter
        bg += (np.asarray(blobs, dtype=np.float32) - 127.5) * (amp / 127.5)
    if rng.random() < 0.35 * clutter:
        phi = rng.uniform(0.0, 2.0 * math.pi)
        period = rng.uniform(0.03, 0.2) * n
        wave = np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * 2.0 * math.pi / period)
        tint = (rng.uniform(-1.0, 1.0, 3) * rng.uniform(8.0, 30.0)).astype(np.float32)
        bg += wave[..., None] * tint
    return bg


def _distractor_lines(rng: np.random.Generator, img: Image.Image, count: int) -> None:
    """Thin segments and polylines: edges a detector must learn are *not* objects."""
    n = img.size[0]
    draw = ImageDraw.Draw(img)
    width_unit = max(1, n // 128)
    for _ in range(count):
        k = int(rng.integers(2, 5))
        start = rng.uniform(0.0, n, 2)
        steps = rng.normal(0.0, rng.uniform(0.05, 0.35) * n, (k - 1, 2))
        pts = np.vstack([start, start + np.cumsum(steps, axis=0)])
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        width = int(rng.integers(1, 3)) * width_unit
        draw.line([(float(x), float(y)) for x, y in pts], fill=colour, width=width)


def _sample_size(rng: np.random.Generator, knobs: Knobs, n_objects: int) -> float:
    """Object extent as a fraction of imgsz: log-uniform, with a separate small-object band."""
    if rng.random() < knobs.p_small:
        lo, hi = MIN_SIZE, SMALL_MAX
    else:
        # crowded images get smaller large objects so a single shape cannot bury all others
        lo, hi = SMALL_MAX, max(SMALL_MAX * 1.5, MAX_SIZE / math.sqrt(max(1.0, n_objects / 2.0)))
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _place(
    rng: np.random.Generator, n: int, size: float, knobs: Knobs, placed: list[_Object]
) -> np.ndarray:
    if placed and rng.random() < knobs.p_occlude:
        # Put it on an earlier object's edge so overlaps happen often, not by rare chance.
        x0, y0, x1, y1 = placed[int(rng.integers(len(placed)))].box
        centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
        reach = 0.5 * max(x1 - x0, y1 - y0) + 0.3 * size
        angle = rng.uniform(0.0, 2.0 * math.pi)
        return centre + reach * rng.uniform(0.6, 1.0) * np.array([math.cos(angle), math.sin(angle)])
    margin = 0.2 * size  # lets shapes be cut by the border, up to about half their extent
    return rng.uniform(margin, n - margin, 2)


def render_image(
    rng: np.random.Generator, n: int, num_classes: int, knobs: Knobs
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]], int]:
    """One image and its labels (cls, cx, cy, w, h normalised); also the count of hidden drops."""
    bg = _background(rng, n, knobs.clutter)
    n_lines = int(rng.poisson(3.0 * knobs.clutter))
    if n_lines:
        pil = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        _distractor_lines(rng, pil, n_lines)
        bg = np.asarray(pil, dtype=np.float32)
    img = np.array(bg, dtype=np.float32)

    n_objects = 0 if rng.random() < NEGATIVE_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    sizes = [_sample_size(rng, knobs, n_objects) for _ in range(n_objects)]
    # Mostly large-first so small shapes land on top; the jitter lets some big ones cover others.
    order = np.argsort(-np.log(sizes) + rng.normal(0.0, 0.5 * knobs.clutter, n_objects))
    placed: list[_Object] = []
    for i in order:
        size = sizes[i] * n
        cls = int(rng.integers(num_classes))
        name = SHAPES[cls]
        rings = BUILDERS[name](rng)
        limit = MAX_ASPECT.get(name, 1.3)
        aspect = math.exp(rng.uniform(-math.log(limit), math.log(limit)))
        # the long side is always `size`, so aspect never makes a shape exceed its sampled scale
        if aspect >= 1:
            sx, sy = size / 2.0, size / 2.0 / aspect
        else:
            sx, sy = size * aspect / 2.0, size / 2.0
        theta = rng.uniform(0.0, 2.0 * math.pi)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        centre = _place(rng, n, size, knobs, placed)
        rings = [((r * (sx, sy)) @ rot.T + centre, adds) for r, adds in rings]
        cov, ox, oy = _rasterize(rings)
        full_area = float(cov.sum())
        x0, y0 = max(ox, 0), max(oy, 0)
        x1, y1 = min(ox + cov.shape[1], n), min(oy + cov.shape[0], n)
        if x1 <= x0 or y1 <= y0 or full_area <= 0.0:
            continue
        alpha = cov[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        region = img[y0:y1, x0:x1]
        colour = _contrasting_colour(rng, region, alpha, knobs.min_contrast)
        fill = _texture(rng, colour, y1 - y0, x1 - x0)
        a3 = alpha[..., None]
        img[y0:y1, x0:x1] = region * (1.0 - a3) + fill * a3
        for obj in placed:
            _occlude(obj, alpha, x0, y0)
        placed.append(_Object(cls, (x0, y0, x1, y1), full_area, alpha.copy()))

    if rng.random() < 0.25 * knobs.clutter:
        # a line or two across objects too, so distractors are not only "behind everything"
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        _distractor_lines(rng, pil, int(rng.integers(1, 3)))
        img = np.asarray(pil, dtype=np.float32)
    sigma = rng.uniform(1.0, 8.0) * knobs.clutter
    img = img + rng.standard_normal((n, n, 3), dtype=np.float32) * sigma

    labels, hidden = [], 0
    for obj in placed:
        if float(obj.visible.sum()) < MIN_VISIBLE * obj.full_area:
            hidden += 1
            continue
        mask = obj.visible > 0.5
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        if cols.size == 0 or cols[-1] - cols[0] + 1 < 2 or rows[-1] - rows[0] + 1 < 2:
            hidden += 1
            continue
        ox, oy = obj.box[0], obj.box[1]
        bx0, bx1, by0, by1 = ox + cols[0], ox + cols[-1] + 1, oy + rows[0], oy + rows[-1] + 1
        labels.append(
            (obj.cls, (bx0 + bx1) / 2 / n, (by0 + by1) / 2 / n, (bx1 - bx0) / n, (by1 - by0) / n)
        )
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, hidden


def _contrasting_colour(
    rng: np.random.Generator, region: np.ndarray, alpha: np.ndarray, min_contrast: float
) -> np.ndarray:
    """A random colour that differs enough from what it covers to be seeable at all.

    Colour stays uniformly random per object (never tied to the class); this only rejects
    colours so close to the local background that the label would be unlearnable noise.
    """
    weight = float(alpha.sum())
    local = (region * alpha[..., None]).sum(axis=(0, 1)) / max(weight, 1e-6)
    best, best_dist = np.zeros(3), -1.0
    for _ in range(8):
        colour = rng.uniform(0.0, 255.0, 3)
        dist = float(np.linalg.norm(colour - local))
        if dist >= min_contrast:
            return colour.astype(np.float32)
        if dist > best_dist:
            best, best_dist = colour, dist
    return best.astype(np.float32)
