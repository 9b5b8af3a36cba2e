"""The synthetic set's shape families: each builder draws one random instance of its family as
polygon rings in a unit frame roughly spanning [-1, 1]^2 (the scene scales, stretches, rotates
and places it, :mod:`.scene`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SHAPES = (
    "ellipse",
    "rectangle",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "arrow",
    "crescent",
    "lshape",
)

Ring = tuple[np.ndarray, bool]  # polygon vertices (k, 2) and whether it adds (True) or cuts


def _circle(k: int = 40, r: float = 1.0, cx: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, k, endpoint=False)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], axis=1)


def _regular(k: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(k) * 2.0 * math.pi / k
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _ellipse(rng: np.random.Generator) -> list[Ring]:
    return [(_circle(), True)]


def _rectangle(rng: np.random.Generator) -> list[Ring]:
    return [(np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), True)]


def _triangle(rng: np.random.Generator) -> list[Ring]:
    angles = np.radians(np.array([-90.0, 30.0, 150.0]) + rng.uniform(-15.0, 15.0, 3))
    return [(np.stack([np.cos(angles), np.sin(angles)], axis=1), True)]


def _star(rng: np.random.Generator) -> list[Ring]:
    outer = _regular(5, 1.0, -math.pi / 2)
    inner = _regular(5, rng.uniform(0.38, 0.5), -math.pi / 2 + math.pi / 5)
    return [(np.stack([outer, inner], axis=1).reshape(-1, 2), True)]


def _cross(rng: np.random.Generator) -> list[Ring]:
    t = rng.uniform(0.22, 0.36)
    pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t),
           (-1, t), (-1, -t), (-t, -t)]  # fmt: skip
    return [(np.array(pts, dtype=np.float64), True)]


def _ring(rng: np.random.Generator) -> list[Ring]:
    return [(_circle(), True), (_circle(r=rng.uniform(0.45, 0.68)), False)]


def _hexagon(rng: np.random.Generator) -> list[Ring]:
    return [(_regular(6), True)]


def _arrow(rng: np.random.Generator) -> list[Ring]:
    s, neck, head = rng.uniform(0.2, 0.32), rng.uniform(-0.1, 0.25), rng.uniform(0.6, 0.85)
    pts = [(-1, -s), (neck, -s), (neck, -head), (1, 0), (neck, head), (neck, s), (-1, s)]
    return [(np.array(pts, dtype=np.float64), True)]


def _crescent(rng: np.random.Generator) -> list[Ring]:
    return [(_circle(), True), (_circle(r=rng.uniform(0.8, 0.92), cx=rng.uniform(0.4, 0.6)), False)]


def _lshape(rng: np.random.Generator) -> list[Ring]:
    t = rng.uniform(-0.45, -0.1)
    pts = [(-1, -1), (t, -1), (t, -t), (1, -t), (1, 1), (-1, 1)]
    return [(np.array(pts, dtype=np.float64), True)]


BUILDERS: dict[str, Callable[[np.random.Generator], list[Ring]]] = {
    "ellipse": _ellipse,
    "rectangle": _rectangle,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "hexagon": _hexagon,
    "arrow": _arrow,
    "crescent": _crescent,
    "lshape": _lshape,
}
# Elongation a shape may take without turning into another family (a thin star is no star).
MAX_ASPECT = {"ellipse": 2.2, "rectangle": 2.5, "triangle": 2.0, "arrow": 1.6, "lshape": 1.8}
