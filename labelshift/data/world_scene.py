"""Drawing one street-like scene of the embedded world: label map and image together.

A scene is drawn far to near with OpenCV primitives, on a label canvas (trainIds of ``cityscapes19``, 255 =
void) and a float colour canvas at once, so the two always agree:

    sky above a horizon; road below it, sidewalks and terrain on its sides; a skyline of buildings (some with
    windows) and trees; walls and fences along the horizon; then poles, hanging traffic lights and signs,
    vehicles (with dark windows and wheels), persons, riders and two-wheelers, sorted by their ground line so
    that nearer objects occlude farther ones and are drawn larger (perspective).

Objects are placed independently of each other: an object's look never depends on which other classes are
present, because that differs between the domains and would break the label-shift assumption
p_s(x|y) = p_t(x|y) (riders therefore stand alone and lights and signs hang free of poles).

Appearance: the classes fall into confusable groups (road/sidewalk, building/wall/fence, pole/light/sign,
vegetation/terrain, person/rider, car/truck/bus/train, motorcycle/bicycle). Each group has a centre colour far
from the others; inside a group the class mean colours differ in hue only (so shading and blur with dark parts
do not turn one class into another), ``class_separation`` apart (three times that for the two-wheelers, which
are both rare in the source and would otherwise not be learnt apart), and every instance draws its colour
around its class mean with ``instance_color_std``. Pixel noise, a small illumination change per image and the
domain's camera (colour cast, blur, extra noise) come last. Shapes differ between the classes of a group only
partly (sizes and aspect ratios overlap), so the class prior decides many instances, as label shift needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from labelshift.classes import IGNORE_INDEX, cityscapes19

_NAMES = cityscapes19().names
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK,
 BUS, TRAIN, MOTORCYCLE, BICYCLE) = (_NAMES.index(n) for n in (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"))
NUM_CLASSES = len(_NAMES)

# (members, RGB centre colour of the group, multiplier of class_separation inside the group)
CONFUSABLE_GROUPS: tuple[tuple[tuple[int, ...], tuple[float, float, float], float], ...] = (
    ((ROAD, SIDEWALK), (112.0, 104.0, 110.0), 1.0),
    ((BUILDING, WALL, FENCE), (168.0, 128.0, 92.0), 1.0),
    ((POLE, LIGHT, SIGN), (214.0, 196.0, 70.0), 1.0),
    ((VEGETATION, TERRAIN), (70.0, 148.0, 56.0), 1.0),
    ((SKY,), (136.0, 188.0, 240.0), 1.0),
    ((PERSON, RIDER), (216.0, 84.0, 84.0), 1.0),
    ((CAR, TRUCK, BUS, TRAIN), (44.0, 96.0, 168.0), 1.0),
    ((MOTORCYCLE, BICYCLE), (158.0, 56.0, 188.0), 3.0),
)
# Orthonormal basis of the chroma plane (orthogonal to grey (1, 1, 1)): classes of a group differ in hue only,
# so brightness changes (shading, blur with dark parts, illumination) move them together, not into each other.
_CHROMA_BASIS = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / np.array([[np.sqrt(2.0)], [np.sqrt(6.0)]])


@dataclass(frozen=True)
class SceneStyle:
    """How a domain renders. Colours are in 0..255 units.

    class_separation: distance between the mean colours of two classes of one confusable group.
    instance_color_std: per-channel spread of an instance's colour around its class mean.
    pixel_noise_std: per-pixel Gaussian noise.
    illumination_jitter: the image brightness is scaled by a factor in [1 - j, 1 + j].
    color_gain, color_offset: per-channel affine colour cast applied last (the domain's camera).
    blur_sigma: Gaussian blur (pixels at 256x128, scaled with the image height) before the noise; 0 = none.
    """

    class_separation: float = 24.0
    instance_color_std: float = 10.0
    pixel_noise_std: float = 5.0
    illumination_jitter: float = 0.06
    color_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    color_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: float = 0.0


def class_mean_colours(class_separation: float) -> np.ndarray:
    """(K, 3) float64 RGB mean colour of each class.

    The m classes of a group sit on a regular polygon in the chroma plane around the group centre, adjacent
    classes ``class_separation`` times the group's multiplier apart (m = 2: a segment, 3: a triangle, 4: a square).
    """
    means = np.zeros((NUM_CLASSES, 3))
    for g, (members, centre, multiplier) in enumerate(CONFUSABLE_GROUPS):
        m = len(members)
        radius = 0.0 if m == 1 else class_separation * multiplier / (2.0 * np.sin(np.pi / m))
        for k, class_id in enumerate(members):
            angle = 2.0 * np.pi * k / m + 0.7 * g
            offset = radius * (np.cos(angle) * _CHROMA_BASIS[0] + np.sin(angle) * _CHROMA_BASIS[1])
            means[class_id] = np.asarray(centre) + offset
    return means


class _Canvas:
    """A label map (H, W) uint8 trainIds and an image (H, W, 3) float32 RGB drawn together."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, means: np.ndarray,
                 instance_std: float) -> None:
        self.height, self.width, self.rng = height, width, rng
        self.scale = height / 128.0
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.label = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
        self.means, self.instance_std = means, instance_std

    def colour(self, class_id: int) -> np.ndarray:
        """A fresh instance colour of ``class_id``: (3,) float64."""
        return self.means[class_id] + self.rng.normal(0.0, self.instance_std, 3)

    def poly(self, class_id: int, points: list[tuple[float, float]], colour: np.ndarray) -> None:
        pts = [np.round(np.asarray(points)).astype(np.int32)]
        cv2.fillPoly(self.label, pts, int(class_id))
        cv2.fillPoly(self.image, pts, colour.tolist())

    def rect(self, class_id: int, x0: float, y0: float, x1: float, y1: float, colour: np.ndarray) -> None:
        self.poly(class_id, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], colour)

    def ellipse(self, class_id: int, centre: tuple[float, float], axes: tuple[float, float],
                colour: np.ndarray, thickness: int = -1) -> None:
        c = (round(centre[0]), round(centre[1]))
        a = (max(1, round(axes[0])), max(1, round(axes[1])))
        cv2.ellipse(self.label, c, a, 0, 0, 360, int(class_id), thickness)
        cv2.ellipse(self.image, c, a, 0, 0, 360, colour.tolist(), thickness)

    def line(self, class_id: int, p0: tuple[float, float], p1: tuple[float, float], colour: np.ndarray,
             thickness: int) -> None:
        a, b = (round(p0[0]), round(p0[1])), (round(p1[0]), round(p1[1]))
        cv2.line(self.label, a, b, int(class_id), max(1, thickness))
        cv2.line(self.image, a, b, colour.tolist(), max(1, thickness))


def _background(cv: _Canvas, present: np.ndarray, horizon: float) -> None:
    """Sky above the horizon, ground below it, sidewalks and terrain on the sides of the road."""
    w, h, rng = cv.width, cv.height, cv.rng
    top = next(c for c in (SKY, BUILDING, VEGETATION) if present[c])
    cv.rect(top, 0, 0, w, horizon, cv.colour(top))
    ground = next(c for c in (ROAD, SIDEWALK, TERRAIN) if present[c])
    cv.rect(ground, 0, horizon, w, h, cv.colour(ground))
    vanish = w * rng.uniform(0.35, 0.65)
    half = w * 0.03
    edges = {-1: w * rng.uniform(-0.25, 0.3), 1: w * rng.uniform(0.7, 1.25)}
    sides = [-1, 1] if rng.random() < 0.5 else [1, -1]
    for kind in (TERRAIN, SIDEWALK):
        if not present[kind] or ground == kind:
            continue
        for i, side in enumerate(sides):
            if rng.random() < (0.6 if kind == TERRAIN else 0.8) or i == 1 and not _drawn(cv, kind):
                _side_band(cv, kind, side, vanish + side * half, edges[side], horizon, kind == TERRAIN)


def _drawn(cv: _Canvas, class_id: int) -> bool:
    return bool((cv.label == class_id).any())


def _side_band(cv: _Canvas, class_id: int, side: int, top_x: float, bottom_x: float, horizon: float,
               whole_side: bool) -> None:
    """A band between the road edge (top_x at the horizon, bottom_x at the bottom) and the image side."""
    w, h = cv.width, cv.height
    outer = -w if side < 0 else 2 * w
    if whole_side:
        far_top, far_bottom = outer, outer
    else:
        spread = w * cv.rng.uniform(0.12, 0.45)
        far_top, far_bottom = top_x + side * w * 0.04, bottom_x + side * spread
    cv.poly(class_id, [(top_x, horizon), (far_top, horizon), (far_bottom, h), (bottom_x, h)], cv.colour(class_id))


def _skyline(cv: _Canvas, present: np.ndarray, horizon: float) -> None:
    """Buildings (some with windows) and trees above the horizon, then walls and fences along it."""
    w, h, rng = cv.width, cv.height, cv.rng
    x = -w * rng.uniform(0.0, 0.1)
    while x < w:
        seg = w * rng.uniform(0.12, 0.35)
        if present[BUILDING] and (rng.random() < 0.65 or x + seg >= w and not _drawn(cv, BUILDING)):
            top = h * rng.uniform(0.03, max(0.05, horizon / h - 0.08))
            colour = cv.colour(BUILDING)
            cv.rect(BUILDING, x, top, x + seg, horizon + h * rng.uniform(0.0, 0.04), colour)
            if rng.random() < 0.4:
                _windows(cv, x, top, x + seg, horizon, colour)
        x += seg
    if present[VEGETATION]:
        for _ in range(rng.integers(1, 5)):
            cx, cy = w * rng.uniform(0, 1), horizon - h * rng.uniform(0.05, 0.3)
            colour = cv.colour(VEGETATION)
            cv.rect(VEGETATION, cx - 1.5 * cv.scale, cy, cx + 1.5 * cv.scale, horizon + h * 0.03, colour * 0.6)
            cv.ellipse(VEGETATION, (cx, cy), (w * rng.uniform(0.05, 0.14), h * rng.uniform(0.07, 0.18)), colour)
    for class_id, heights in ((WALL, (0.06, 0.18)), (FENCE, (0.05, 0.15))):
        if present[class_id]:
            for _ in range(rng.integers(1, 3)):
                x0, bottom = w * rng.uniform(-0.1, 0.8), horizon + h * rng.uniform(0.0, 0.1)
                height = h * rng.uniform(*heights)
                cv.rect(class_id, x0, bottom - height, x0 + w * rng.uniform(0.15, 0.45), bottom,
                        cv.colour(class_id))


def _windows(cv: _Canvas, x0: float, y0: float, x1: float, y1: float, colour: np.ndarray) -> None:
    step = 8.0 * cv.scale
    for wy in np.arange(y0 + step / 2, y1 - step, step):
        for wx in np.arange(x0 + step / 2, x1 - step / 2, step):
            cv.rect(BUILDING, wx, wy, wx + step / 2, wy + step / 2, colour * 0.7)


_VEHICLE_SHAPES = {  # class: (width range as a fraction of the image width at depth 1, height / width range)
    CAR: ((0.14, 0.22), (0.45, 0.6)),
    TRUCK: ((0.18, 0.3), (0.6, 0.8)),
    BUS: ((0.26, 0.4), (0.45, 0.62)),
    TRAIN: ((0.4, 0.65), (0.3, 0.42)),
}
_CYCLE_SHAPES = {MOTORCYCLE: (0.12, 0.18), BICYCLE: (0.11, 0.17)}  # width as a fraction of the image width


def _depth(cv: _Canvas, base: float, horizon: float) -> float:
    """Perspective size factor in [0.3, 1] of an object standing at row ``base``."""
    return 0.3 + 0.7 * float(np.clip((base - horizon) / (cv.height - horizon), 0.0, 1.0))


def _pole(cv: _Canvas, class_id: int, x: float, base: float, f: float) -> None:
    """A pole (``class_id`` is POLE) standing at (x, base)."""
    height = min(base - 2, cv.height * (0.2 + 0.45 * f) * cv.rng.uniform(0.8, 1.15))
    half = max(1.0, (1.2 + 2.0 * f) * cv.scale)
    cv.rect(POLE, x - half, base - height, x + half, base, cv.colour(POLE))


def _mounted_box(cv: _Canvas, class_id: int, x: float, base: float, f: float) -> None:
    """A traffic light (tall box) or sign (squarish box) hanging above the ground point (x, base).

    Lights and signs never sit on a drawn pole: their look must not depend on whether poles are present,
    which differs between the domains (the label-shift assumption p_s(x|y) = p_t(x|y)).
    """
    rng, s = cv.rng, cv.scale
    if class_id == LIGHT:
        width, aspect = (5 + 7 * f) * s, rng.uniform(1.6, 2.4)
    else:
        width, aspect = (8 + 10 * f) * s, rng.uniform(0.8, 1.25)
    top = base - cv.height * (0.2 + 0.45 * f) * rng.uniform(0.75, 1.1)
    cv.rect(class_id, x - width / 2, top, x + width / 2, top + width * aspect, cv.colour(class_id))


def _vehicle(cv: _Canvas, class_id: int, x: float, base: float, f: float) -> None:
    """A box with a darker window band and two dark wheels, all labelled ``class_id``."""
    widths, aspects = _VEHICLE_SHAPES[class_id]
    width = cv.width * f * cv.rng.uniform(*widths)
    height = width * cv.rng.uniform(*aspects)
    colour = cv.colour(class_id)
    x0, x1, top = x - width / 2, x + width / 2, base - height
    cv.rect(class_id, x0, top, x1, base - 0.1 * height, colour)
    cv.rect(class_id, x0 + 0.1 * width, top + 0.1 * height, x1 - 0.1 * width, top + 0.4 * height, colour * 0.55)
    radius = 0.12 * min(width, 2 * height)
    for wx in (x0 + 0.2 * width, x1 - 0.2 * width):
        cv.ellipse(class_id, (wx, base - radius), (radius, radius), colour * 0.3)


def _person(cv: _Canvas, class_id: int, x: float, base: float, f: float) -> None:
    """Head, body and legs of a person (or a rider without a visible two-wheeler)."""
    height = cv.height * (0.14 + 0.26 * f) * cv.rng.uniform(0.85, 1.15)
    half = height * 0.16
    colour = cv.colour(class_id)
    cv.ellipse(class_id, (x, base - 0.9 * height), (half * 0.7, half * 0.7), colour)
    cv.ellipse(class_id, (x, base - 0.55 * height), (half, 0.28 * height), colour)
    for dx in (-0.5 * half, 0.5 * half):
        cv.line(class_id, (x + dx, base - 0.35 * height), (x + 1.4 * dx, base), colour, round(0.6 * half))


def _cycle(cv: _Canvas, class_id: int, x: float, base: float, f: float) -> None:
    """Two wheels and a frame; a motorcycle also has an engine block."""
    width = cv.width * f * cv.rng.uniform(*_CYCLE_SHAPES[class_id])
    radius = width * 0.25
    colour = cv.colour(class_id)
    thick = max(2, round(radius * 0.8))
    centres = [(x - width / 2 + radius, base - radius), (x + width / 2 - radius, base - radius)]
    for centre in centres:
        cv.ellipse(class_id, centre, (radius, radius), colour * 0.5)
    seat = (x, base - 2.2 * radius)
    cv.line(class_id, centres[0], seat, colour, thick)
    cv.line(class_id, seat, centres[1], colour, thick)
    if class_id == MOTORCYCLE:
        cv.ellipse(class_id, (x, base - 1.3 * radius), (1.1 * radius, 0.7 * radius), colour)


# kind of object -> (classes, lowest ground line as a fraction of the ground height)
_OBJECT_KINDS: dict[str, tuple[tuple[int, ...], float]] = {
    "pole": ((POLE,), 0.1),
    "mounted": ((LIGHT, SIGN), 0.1),
    "vehicle": ((CAR, TRUCK, BUS, TRAIN), 0.15),
    "person": ((PERSON, RIDER), 0.05),
    "cycle": ((MOTORCYCLE, BICYCLE), 0.05),
}
# (fewest, most) instances of a present class. Riders and two-wheelers come in groups, so that the classes
# rarest in the source still give a few hundred training instances while staying rare in images.
_INSTANCES: dict[int, tuple[int, int]] = {
    POLE: (1, 3), LIGHT: (1, 2), SIGN: (1, 2), CAR: (1, 3), TRUCK: (1, 2), BUS: (1, 2), TRAIN: (1, 1),
    PERSON: (1, 3), RIDER: (2, 4), MOTORCYCLE: (2, 4), BICYCLE: (2, 4),
}
_DRAW = {"pole": _pole, "mounted": _mounted_box, "vehicle": _vehicle, "person": _person, "cycle": _cycle}


def _objects(cv: _Canvas, present: np.ndarray, horizon: float) -> None:
    """Every object of a present class, drawn from the farthest ground line to the nearest.

    Objects are placed independently of each other (riders stand alone, lights and signs hang free), so an
    object's appearance does not depend on which other classes a domain tends to show.
    """
    rng, ground = cv.rng, cv.height - horizon
    items: list[tuple[float, int, str, int, float]] = []
    for kind, (classes, low) in _OBJECT_KINDS.items():
        for class_id in classes:
            if not present[class_id]:
                continue
            fewest, most = _INSTANCES[class_id]
            for _ in range(rng.integers(fewest, most + 1)):
                base = horizon + ground * rng.uniform(low, 1.0)
                items.append((base, len(items), kind, class_id, cv.width * rng.uniform(0.0, 1.0)))
    for base, _, kind, class_id, x in sorted(items):
        _DRAW[kind](cv, class_id, x, base, _depth(cv, base, horizon))


def render_scene(rng: np.random.Generator, present: np.ndarray, size: tuple[int, int],
                 style: SceneStyle) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene containing the classes flagged in ``present`` ((K,) bool).

    Returns: image (H, W, 3) uint8 RGB and train_ids (H, W) uint8 (255 = void), with ``size`` = (W, H).
    Every scene has a ground and a top: with no road, sidewalk or terrain flagged, the road is added; with no
    sky, building or vegetation, the sky. A flagged class may end up invisible when nearer objects cover it;
    callers count the labels.
    """
    width, height = size
    present = present.copy()
    if not present[[SKY, BUILDING, VEGETATION]].any():
        present[SKY] = True
    if not present[[ROAD, SIDEWALK, TERRAIN]].any():
        present[ROAD] = True
    cv = _Canvas(height, width, rng, class_mean_colours(style.class_separation), style.instance_color_std)
    horizon = height * rng.uniform(0.36, 0.5)
    _background(cv, present, horizon)
    _skyline(cv, present, horizon)
    _objects(cv, present, horizon)
    image = cv.image * (1.0 + style.illumination_jitter * rng.uniform(-1.0, 1.0))
    image = image * np.asarray(style.color_gain, dtype=np.float32) + np.asarray(style.color_offset, np.float32)
    if style.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), style.blur_sigma * cv.scale)
    image = image + rng.normal(0.0, style.pixel_noise_std, image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), cv.label
