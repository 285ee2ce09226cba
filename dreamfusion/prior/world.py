"""The procedural world of ``shared/world/SPEC.md``: colours, the 16 objects as signed distance
functions with per-part colours, captions and held-out pairs.

This module is the one definition of the world: the prior's training data, the tests and the
quality benchmark all read it. Every object is translated so that the centre of its axis-aligned
bounding box is the origin; +Z is up and the front faces +X.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from ..cameras import view_label

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.50, 0.70),
    "white": (0.92, 0.92, 0.92),
    "black": (0.08, 0.08, 0.08),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.50, 0.30, 0.12),
    "cyan": (0.10, 0.80, 0.85),
}
COLOUR_NAMES = tuple(COLOURS)
PART_COLOURS = {
    "tan": (0.85, 0.60, 0.30),
    "patty": (0.35, 0.18, 0.08),
    "leaf": (0.30, 0.70, 0.20),
    "bark": (0.40, 0.25, 0.10),
    "roof": (0.35, 0.20, 0.15),
    "door": (0.25, 0.15, 0.08),
    "orange": COLOURS["orange"],
    "white": COLOURS["white"],
    "black": COLOURS["black"],
}

PRIMITIVES = ("cube", "sphere", "cylinder", "cone", "torus", "capsule", "pyramid")
COLOURED_COMPOSITES = ("mug", "mushroom", "table", "chair", "house", "dumbbell")
FIXED_COMPOSITES = ("snowman", "tree", "hamburger")
#: nouns that take a colour word, in the SPEC's index order (used by the held-out rule)
COLOURABLE_NOUNS = PRIMITIVES + COLOURED_COMPOSITES
NOUNS = COLOURABLE_NOUNS + FIXED_COMPOSITES
DEFAULT_COLOUR = {"mug": "white", "mushroom": "red", "table": "brown", "chair": "brown", "house": "white", "dumbbell": "gray"}
ASYMMETRIC_NOUNS = ("mug", "chair", "house", "snowman")


def is_held_out(colour: str, noun: str) -> bool:
    """SPEC: (colour, noun) pairs with (3 * colour_index + noun_index + 4) % 7 == 0 never appear in
    training. Fixed-colour objects have no pairs."""
    if noun not in COLOURABLE_NOUNS or colour not in COLOURS:
        return False
    return (3 * COLOUR_NAMES.index(colour) + COLOURABLE_NOUNS.index(noun) + 4) % 7 == 0


HELD_OUT_PAIRS = tuple((c, n) for c in COLOUR_NAMES for n in COLOURABLE_NOUNS if is_held_out(c, n))


# ----------------------------------------------------------------------------- SDF parts
# Each part takes points (N, 3) and returns signed distances (N,), and knows its bounding box.


def _length2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


@dataclass(frozen=True)
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        lo, hi = p.new_tensor(self.lo), p.new_tensor(self.hi)
        q = (p - (lo + hi) / 2).abs() - (hi - lo) / 2
        return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0)

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.lo, self.hi


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        return (p - p.new_tensor(self.centre)).norm(dim=-1) - self.radius

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(c - self.radius for c in self.centre), tuple(c + self.radius for c in self.centre)


@dataclass(frozen=True)
class Frustum:
    """A capped cone from point ``a`` (radius ``ra``) to point ``b`` (radius ``rb``): a cylinder
    when the radii are equal, a cone when ``rb`` is 0. Exact distance (after Inigo Quilez)."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    ra: float
    rb: float

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        a, b = p.new_tensor(self.a), p.new_tensor(self.b)
        axis = b - a
        h = axis.norm() / 2
        axis = axis / (2 * h)
        rel = p - (a + b) / 2
        qy = rel @ axis
        qx = (rel - qy[:, None] * axis).norm(dim=-1)
        r1, r2 = self.ra, self.rb
        k1x, k1y = r2, h
        k2x, k2y = r2 - r1, 2 * h
        ca_x = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r1), torch.full_like(qx, r2)))
        ca_y = qy.abs() - h
        tt = (((k1x - qx) * k2x + (k1y - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0, 1)
        cb_x = qx - k1x + k2x * tt
        cb_y = qy - k1y + k2y * tt
        s = torch.where((cb_x < 0) & (ca_y < 0), -1.0, 1.0)
        return s * torch.sqrt(torch.minimum(ca_x**2 + ca_y**2, cb_x**2 + cb_y**2))

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        r = max(self.ra, self.rb)
        lo, hi = [], []
        for ai, bi in zip(self.a, self.b, strict=True):
            along = ai != bi  # all frustums of the world are axis-aligned
            lo.append(min(ai, bi) if along else ai - r)
            hi.append(max(ai, bi) if along else ai + r)
        return tuple(lo), tuple(hi)


@dataclass(frozen=True)
class Torus:
    centre: tuple[float, float, float]
    major: float
    minor: float
    axis: int = 2  # index of the axis the torus turns around

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        rel = p - p.new_tensor(self.centre)
        ax = rel[:, self.axis]
        others = [i for i in range(3) if i != self.axis]
        ring = _length2(rel[:, others[0]], rel[:, others[1]]) - self.major
        return _length2(ring, ax) - self.minor

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        ext = [self.major + self.minor] * 3
        ext[self.axis] = self.minor
        return tuple(c - e for c, e in zip(self.centre, ext, strict=True)), tuple(c + e for c, e in zip(self.centre, ext, strict=True))


@dataclass(frozen=True)
class Capsule:
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radius: float

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        a, b = p.new_tensor(self.a), p.new_tensor(self.b)
        pa, ba = p - a, b - a
        h = ((pa @ ba) / (ba @ ba)).clamp(0, 1)
        return (pa - h[:, None] * ba).norm(dim=-1) - self.radius

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (tuple(min(x, y) - self.radius for x, y in zip(self.a, self.b, strict=True)),
                tuple(max(x, y) + self.radius for x, y in zip(self.a, self.b, strict=True)))


@dataclass(frozen=True)
class Pyramid:
    """Square base of side ``side`` at z = ``z0`` (edges along X and Y), apex ``height`` above.
    Exact distance (after Inigo Quilez), computed in units of the side."""

    side: float
    height: float
    z0: float

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        s = self.side
        h = self.height / s
        x, y, z = p[:, 0].abs() / s, (p[:, 2] - self.z0) / s, p[:, 1].abs() / s  # y is up in the formula
        swap = z > x
        x, z = torch.where(swap, z, x), torch.where(swap, x, z)
        x, z = x - 0.5, z - 0.5
        m2 = h * h + 0.25
        qx, qy, qz = z, h * y - 0.5 * x, h * x + 0.5 * y
        sv = (-qx).clamp_min(0)
        t = ((qy - 0.5 * z) / (m2 + 0.25)).clamp(0, 1)
        a = m2 * (qx + sv) ** 2 + qy * qy
        b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
        d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0, torch.zeros_like(a), torch.minimum(a, b))
        d = torch.sqrt((d2 + qz * qz) / m2) * torch.sign(torch.maximum(qz, -y))
        # Quilez's formula measures the sloping faces only: add the base (below it, and inside near it)
        below = torch.sqrt(x.clamp_min(0) ** 2 + z.clamp_min(0) ** 2 + y * y)
        return torch.where(y < 0, below, torch.maximum(d, -y)) * s

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (-self.side / 2, -self.side / 2, self.z0), (self.side / 2, self.side / 2, self.z0 + self.height)


@dataclass(frozen=True)
class UpperHalfEllipsoid:
    """Upper half (z >= centre z) of an ellipsoid; a sphere when the radii are equal. The
    ellipsoid's distance is Quilez's bound, exact for a sphere."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        rel = p - p.new_tensor(self.centre)
        r = p.new_tensor(self.radii)
        if len(set(self.radii)) == 1:
            d = rel.norm(dim=-1) - self.radii[0]
        else:
            k0 = (rel / r).norm(dim=-1)
            k1 = (rel / (r * r)).norm(dim=-1).clamp_min(1e-9)
            d = k0 * (k0 - 1) / k1
        return torch.maximum(d, -rel[:, 2])

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        c, r = self.centre, self.radii
        return (c[0] - r[0], c[1] - r[1], c[2]), (c[0] + r[0], c[1] + r[1], c[2] + r[2])


@dataclass(frozen=True)
class TriangularPrism:
    """A prism along Y from ``y0`` to ``y1`` with a triangle cross-section in (x, z)."""

    triangle: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    y0: float
    y1: float

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        px, pz = p[:, 0], p[:, 2]
        verts = self.triangle
        d2 = None
        sign_terms = []
        for i in range(3):
            (ax, az), (bx, bz) = verts[i], verts[(i + 1) % 3]
            ex, ez = bx - ax, bz - az
            wx, wz = px - ax, pz - az
            t = ((wx * ex + wz * ez) / (ex * ex + ez * ez)).clamp(0, 1)
            dx, dz = wx - ex * t, wz - ez * t
            dd = dx * dx + dz * dz
            d2 = dd if d2 is None else torch.minimum(d2, dd)
            sign_terms.append(ex * wz - ez * wx)
        inside = ((sign_terms[0] >= 0) & (sign_terms[1] >= 0) & (sign_terms[2] >= 0)) | (
            (sign_terms[0] <= 0) & (sign_terms[1] <= 0) & (sign_terms[2] <= 0))
        d_xz = torch.where(inside, -1.0, 1.0) * torch.sqrt(d2)
        half = (self.y1 - self.y0) / 2
        d_y = (p[:, 1] - (self.y0 + self.y1) / 2).abs() - half
        return torch.minimum(torch.maximum(d_xz, d_y), torch.zeros_like(d_xz)) + _length2(d_xz.clamp_min(0), d_y.clamp_min(0))

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        xs = [v[0] for v in self.triangle]
        zs = [v[1] for v in self.triangle]
        return (min(xs), self.y0, min(zs)), (max(xs), self.y1, max(zs))


# ----------------------------------------------------------------------------- objects


@dataclass
class WorldObject:
    """A union of coloured parts, centred on its bounding box."""

    noun: str
    parts: list = field(default_factory=list)  # SDF parts, before centring
    colours: list = field(default_factory=list)  # rgb per part
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # subtracted from the raw coordinates

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Axis-aligned bounding box (after centring): two (3,) tensors."""
        los, his = zip(*(part.bounds() for part in self.parts), strict=True)
        lo = torch.tensor(los).min(dim=0).values - torch.tensor(self.offset)
        hi = torch.tensor(his).max(dim=0).values - torch.tensor(self.offset)
        return lo, hi

    def part_sdfs(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) centred points -> (N, P) signed distance to each part."""
        raw = points + points.new_tensor(self.offset)
        return torch.stack([part.sdf(raw) for part in self.parts], dim=-1)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) signed distance of the union (negative inside)."""
        return self.part_sdfs(points).min(dim=-1).values

    def colour(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N, 3): the colour of the part whose surface is nearest."""
        idx = self.part_sdfs(points).abs().argmin(dim=-1)
        return points.new_tensor(self.colours)[idx]

    def nearest_part(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) index of the part whose surface is nearest (what decides a point's colour)."""
        return self.part_sdfs(points).abs().argmin(dim=-1)

    def sdf_and_colour(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.part_sdfs(points)
        idx = d.abs().argmin(dim=-1)
        return d.min(dim=-1).values, points.new_tensor(self.colours)[idx]

    def occupancy(self, points: torch.Tensor) -> torch.Tensor:
        return self.sdf(points) <= 0


def _parts(noun: str, c: tuple[float, float, float]) -> list[tuple[object, tuple[float, float, float]]]:
    P = PART_COLOURS
    if noun == "cube":
        return [(Box((-0.35, -0.35, -0.35), (0.35, 0.35, 0.35)), c)]
    if noun == "sphere":
        return [(Sphere((0, 0, 0), 0.42), c)]
    if noun == "cylinder":
        return [(Frustum((0, 0, -0.40), (0, 0, 0.40), 0.30, 0.30), c)]
    if noun == "cone":
        return [(Frustum((0, 0, -0.40), (0, 0, 0.40), 0.40, 0.0), c)]
    if noun == "torus":
        return [(Torus((0, 0, 0), 0.33, 0.13, axis=2), c)]
    if noun == "capsule":
        return [(Capsule((0, 0, -0.25), (0, 0, 0.25), 0.22), c)]
    if noun == "pyramid":
        return [(Pyramid(0.75, 0.75, -0.375), c)]
    if noun == "mug":
        return [(Frustum((0, 0, -0.30), (0, 0, 0.30), 0.25, 0.25), c), (Torus((0, 0.31, 0), 0.12, 0.035, axis=0), c)]
    if noun == "mushroom":
        return [(Frustum((0, 0, 0), (0, 0, 0.40), 0.11, 0.11), P["white"]), (UpperHalfEllipsoid((0, 0, 0.35), (0.36,) * 3), c)]
    if noun == "table":
        legs = [(Box((x - 0.03, y - 0.03, 0), (x + 0.03, y + 0.03, 0.44)), c) for x in (-0.39, 0.39) for y in (-0.24, 0.24)]
        return [(Box((-0.45, -0.30, 0.44), (0.45, 0.30, 0.50)), c)] + legs
    if noun == "chair":
        legs = [(Box((x - 0.025, y - 0.025, 0), (x + 0.025, y + 0.025, 0.40)), c) for x in (-0.22, 0.22) for y in (-0.22, 0.22)]
        return [(Box((-0.25, -0.25, 0.40), (0.25, 0.25, 0.46)), c), (Box((-0.25, -0.25, 0.46), (-0.19, 0.25, 0.96)), c)] + legs
    if noun == "house":
        return [
            (Box((-0.30, -0.35, 0), (0.30, 0.35, 0.45)), c),
            (TriangularPrism(((-0.36, 0.45), (0.36, 0.45), (0.0, 0.75)), -0.40, 0.40), P["roof"]),
            (Box((0.30, -0.08, 0), (0.32, 0.08, 0.26)), P["door"]),
        ]
    if noun == "dumbbell":
        return [(Frustum((0, -0.35, 0), (0, 0.35, 0), 0.04, 0.04), c), (Sphere((0, 0.38, 0), 0.17), c), (Sphere((0, -0.38, 0), 0.17), c)]
    if noun == "snowman":
        return [
            (Sphere((0, 0, 0), 0.26), P["white"]),
            (Sphere((0, 0, 0.38), 0.19), P["white"]),
            (Sphere((0, 0, 0.64), 0.13), P["white"]),
            (Frustum((0.10, 0, 0.64), (0.24, 0, 0.64), 0.035, 0.0), P["orange"]),
            (Sphere((0.115, 0.05, 0.68), 0.02), P["black"]),
            (Sphere((0.115, -0.05, 0.68), 0.02), P["black"]),
        ]
    if noun == "tree":
        return [(Frustum((0, 0, 0), (0, 0, 0.30), 0.07, 0.07), P["bark"]), (Frustum((0, 0, 0.25), (0, 0, 0.95), 0.35, 0.0), P["leaf"])]
    if noun == "hamburger":
        return [
            (Frustum((0, 0, 0), (0, 0, 0.12), 0.40, 0.40), P["tan"]),
            (Frustum((0, 0, 0.12), (0, 0, 0.22), 0.42, 0.42), P["patty"]),
            (Frustum((0, 0, 0.22), (0, 0, 0.26), 0.44, 0.44), P["leaf"]),
            (UpperHalfEllipsoid((0, 0, 0.26), (0.40, 0.40, 0.20)), P["tan"]),
        ]
    raise ValueError(f"unknown noun {noun!r}; expected one of {', '.join(NOUNS)}")


_OBJECT_CACHE: dict[tuple[str, str | None], WorldObject] = {}


def build_object(noun: str, colour: str | None = None) -> WorldObject:
    """The object for a noun and colour name (default colour where the noun has one; fixed-colour
    objects ignore ``colour``; a primitive needs one)."""
    if noun in FIXED_COMPOSITES:
        colour = None
    elif colour is None:
        if noun not in DEFAULT_COLOUR:
            raise ValueError(f"a {noun} needs a colour")
        colour = DEFAULT_COLOUR[noun]
    elif colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(COLOUR_NAMES)}")
    key = (noun, colour)
    if key not in _OBJECT_CACHE:
        parts = _parts(noun, COLOURS[colour] if colour else (1.0, 1.0, 1.0))
        obj = WorldObject(noun, [p for p, _ in parts], [tuple(float(v) for v in c) for _, c in parts])
        lo, hi = obj.bounds()
        obj.offset = tuple(((lo + hi) / 2).tolist())
        _OBJECT_CACHE[key] = obj
    return _OBJECT_CACHE[key]


# ----------------------------------------------------------------------------- captions

PHRASE_TEMPLATES_COLOURED = (
    "a {colour} {noun}",
    "a {noun} that is {colour}",
    "a photo of a {colour} {noun}",
    "a 3d render of a {colour} {noun}",
    "a {colour} colored {noun}",
    "a small {colour} {noun}",
    "an image of a {colour} {noun}",
    "a {colour} {noun} on a plain background",
)
PHRASE_TEMPLATES_PLAIN = (
    "a {noun}",
    "a photo of a {noun}",
    "a 3d render of a {noun}",
    "an image of a {noun}",
    "a {noun} on a plain background",
)


def _article_fix(text: str) -> str:
    """'a orange cube' -> 'an orange cube'."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][:1] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def phrase(noun: str, colour: str | None, template: str) -> str:
    return _article_fix(template.format(noun=noun, colour=colour or ""))


def caption(phrase_text: str, azimuth: float, elevation: float) -> str:
    """SPEC form: '<phrase>, <view label>'."""
    return f"{phrase_text}, {view_label(azimuth, elevation)}"


#: the words people use for each object, the world's own noun first (prior v2's captions; a
#: synonym never stands for another object of the world)
NOUN_WORDS: dict[str, tuple[str, ...]] = {
    "cube": ("cube", "box", "block"),
    "sphere": ("sphere", "ball", "orb"),
    "cylinder": ("cylinder", "round pillar"),
    "cone": ("cone",),
    "torus": ("torus", "donut", "ring"),
    "capsule": ("capsule", "pill"),
    "pyramid": ("pyramid",),
    "mug": ("mug", "cup", "coffee mug"),
    "mushroom": ("mushroom", "toadstool"),
    "table": ("table", "dining table"),
    "chair": ("chair", "dining chair"),
    "house": ("house", "cottage", "little house"),
    "dumbbell": ("dumbbell", "hand weight"),
    "snowman": ("snowman", "snow man"),
    "tree": ("tree", "pine tree", "fir tree"),
    "hamburger": ("hamburger", "burger"),
}
#: colour words, the SPEC's name first; then materials that stand for a colour
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald green"),
    "blue": ("blue", "royal blue"),
    "yellow": ("yellow", "lemon yellow"),
    "orange": ("orange", "bright orange"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose pink"),
    "white": ("white", "snow white"),
    "black": ("black", "jet black"),
    "gray": ("gray", "grey"),
    "brown": ("brown", "chocolate brown"),
    "cyan": ("cyan", "turquoise"),
}
MATERIAL_WORDS: dict[str, tuple[str, ...]] = {
    "brown": ("wooden",),
    "yellow": ("golden",),
    "gray": ("silver", "metal"),
    "white": ("porcelain",),
}
PHRASE_TEMPLATES_MATERIAL = ("a {colour} {noun}", "a {noun} made of {material}")
#: probability that a caption uses a synonym instead of the world's own word
SYNONYM_PROBABILITY = 0.35


@dataclass(frozen=True)
class Draw:
    """One training example's content: the object, its colour name (None for fixed colours) and
    the phrase naming it (without the view label)."""

    noun: str
    colour: str | None
    phrase: str


def _word(options: tuple[str, ...], rng: random.Random, synonyms: bool) -> str:
    return rng.choice(options[1:]) if synonyms and len(options) > 1 and rng.random() < SYNONYM_PROBABILITY else options[0]


def draw_example(rng: random.Random, synonyms: bool = False, asymmetric_fraction: float = 0.0) -> Draw:
    """A random (noun, colour, phrase) for training: never a held-out pair. ``synonyms``: the
    phrase may name the object and its colour in other words (:data:`NOUN_WORDS`,
    :data:`COLOUR_WORDS`, :data:`MATERIAL_WORDS`); the pair it shows is still one the SPEC allows.
    ``asymmetric_fraction``: with this probability the noun is drawn from :data:`ASYMMETRIC_NOUNS`
    only (the objects whose every azimuth looks different), otherwise from all nouns; at 0 the
    random stream is the same as before the option existed."""
    if asymmetric_fraction > 0 and rng.random() < asymmetric_fraction:
        noun = rng.choice(ASYMMETRIC_NOUNS)
    else:
        noun = rng.choice(NOUNS)
    noun_word = _word(NOUN_WORDS[noun], rng, synonyms)
    if noun in FIXED_COMPOSITES:
        return Draw(noun, None, phrase(noun_word, None, rng.choice(PHRASE_TEMPLATES_PLAIN)))
    named = rng.random() < 0.8
    if noun in DEFAULT_COLOUR and not named:  # SPEC: a composite with no colour word takes its default
        return Draw(noun, DEFAULT_COLOUR[noun], phrase(noun_word, None, rng.choice(PHRASE_TEMPLATES_PLAIN)))
    while True:  # redraw until the pair is allowed
        colour = rng.choice(COLOUR_NAMES)
        if not is_held_out(colour, noun):
            break
    if not named:
        return Draw(noun, colour, phrase(noun_word, None, rng.choice(PHRASE_TEMPLATES_PLAIN)))
    if synonyms and colour in MATERIAL_WORDS and rng.random() < 0.15:
        material = rng.choice(MATERIAL_WORDS[colour])
        template = rng.choice(PHRASE_TEMPLATES_MATERIAL)
        text = template.format(noun=noun_word, colour=material, material="wood" if material == "wooden" else material)
        return Draw(noun, colour, _article_fix(text))
    return Draw(noun, colour, phrase(noun_word, _word(COLOUR_WORDS[colour], rng, synonyms), rng.choice(PHRASE_TEMPLATES_COLOURED)))


def _find_word(text: str, table: dict[str, tuple[str, ...]]) -> str | None:
    """The key of ``table`` whose word appears earliest in ``text`` (longest words first, whole words)."""
    best = None
    for key, words in table.items():
        for w in words:
            m = re.search(rf"\b{re.escape(w)}\b", text)
            if m and (best is None or (m.start(), -len(w)) < best[0]):
                best = ((m.start(), -len(w)), key)
    return best[1] if best else None


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """Best-effort (noun, colour) named by a prompt of the world's vocabulary, synonyms and
    materials included ("a crimson box" -> ("cube", "red"), "a wooden chair" -> ("chair", "brown"))."""
    text = " ".join(prompt.lower().replace(",", " ").replace("-", " ").split())
    noun = _find_word(text, NOUN_WORDS)
    colours = {c: COLOUR_WORDS[c] + MATERIAL_WORDS.get(c, ()) + (("wood",) if c == "brown" else ()) for c in COLOUR_NAMES}
    colour = _find_word(text, colours)
    return noun, colour


def all_objects() -> list[WorldObject]:
    """One instance of each of the 16 shapes (default or first allowed colour): for geometric
    R-Precision, where only the shape matters."""
    out = []
    for noun in NOUNS:
        colour = DEFAULT_COLOUR.get(noun, "gray") if noun not in FIXED_COMPOSITES else None
        out.append(build_object(noun, colour))
    return out


def bounding_radius() -> float:
    """Radius of a sphere around the origin that contains every object (for ray marching)."""
    r = 0.0
    for obj in all_objects():
        lo, hi = obj.bounds()
        r = max(r, float(torch.maximum(lo.abs(), hi.abs()).norm()))
    return r

