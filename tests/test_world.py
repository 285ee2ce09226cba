"""The procedural world against shared/world/SPEC.md: geometry (checked from the SDFs themselves),
orientation, colours, the held-out rule, captions and the prior's training renders."""

import math
import random
import re

import pytest
import torch

from dreamfusion.cameras import default_light, make_cameras, view_label
from dreamfusion.prior.data import BACKGROUND, render_batch, render_object
from dreamfusion.prior.world import (
    ASYMMETRIC_NOUNS,
    COLOUR_NAMES,
    COLOURABLE_NOUNS,
    COLOURED_COMPOSITES,
    COLOURS,
    DEFAULT_COLOUR,
    FIXED_COMPOSITES,
    HELD_OUT_PAIRS,
    NOUNS,
    PART_COLOURS,
    PRIMITIVES,
    all_objects,
    build_object,
    caption,
    draw_example,
    is_held_out,
)

# ----------------------------------------------------------------------------- SPEC tables

SPEC_COLOURS = {
    "red": (0.85, 0.10, 0.10), "green": (0.10, 0.70, 0.20), "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10), "orange": (1.00, 0.50, 0.05), "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.50, 0.70), "white": (0.92, 0.92, 0.92), "black": (0.08, 0.08, 0.08),
    "gray": (0.50, 0.50, 0.50), "brown": (0.50, 0.30, 0.12), "cyan": (0.10, 0.80, 0.85),
}
SPEC_PARTS = {
    "tan": (0.85, 0.60, 0.30), "patty": (0.35, 0.18, 0.08), "leaf": (0.30, 0.70, 0.20),
    "bark": (0.40, 0.25, 0.10), "roof": (0.35, 0.20, 0.15), "door": (0.25, 0.15, 0.08),
}
SPEC_COLOUR_ORDER = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "brown", "cyan")
SPEC_NOUN_ORDER = ("cube", "sphere", "cylinder", "cone", "torus", "capsule", "pyramid", "mug", "mushroom", "table", "chair", "house", "dumbbell")

# AABB extents (x, y, z) from the SPEC's definitions, worked by hand
SPEC_EXTENTS = {
    "cube": (0.70, 0.70, 0.70),
    "sphere": (0.84, 0.84, 0.84),
    "cylinder": (0.60, 0.60, 0.80),
    "cone": (0.80, 0.80, 0.80),
    "torus": (0.92, 0.92, 0.26),  # 2 * (0.33 + 0.13), 2 * 0.13
    "capsule": (0.44, 0.44, 0.94),  # 2 * 0.22, 0.50 + 2 * 0.22
    "pyramid": (0.75, 0.75, 0.75),
    "mug": (0.50, 0.715, 0.60),  # y from -0.25 to 0.31 + 0.12 + 0.035; handle z +-0.155 inside body's +-0.30
    "mushroom": (0.72, 0.72, 0.71),  # z from 0 (stem) to 0.35 + 0.36
    "table": (0.90, 0.60, 0.50),
    "chair": (0.50, 0.50, 0.96),
    "house": (0.72, 0.80, 0.75),  # roof overhang +-0.36 in x, +-0.40 in y, apex 0.75
    "dumbbell": (0.34, 1.10, 0.34),  # y: 0.38 + 0.17 each side
    "snowman": (0.52, 0.52, 1.03),  # z from -0.26 to 0.64 + 0.13; nose tip x 0.24 < 0.26
    "tree": (0.70, 0.70, 0.95),
    "hamburger": (0.88, 0.88, 0.46),  # lettuce radius 0.44; top 0.26 + 0.20
}

# ----------------------------------------------------------------------------- helpers

GRID_N = 97  # odd: the grid contains the axes, so apexes on the Z axis are sampled
GRID_HALF = 0.7
VOXEL = 2 * GRID_HALF / (GRID_N - 1)
_AXIS = torch.linspace(-GRID_HALF, GRID_HALF, GRID_N)
_GRID = torch.stack(torch.meshgrid(_AXIS, _AXIS, _AXIS, indexing="ij"), dim=-1).reshape(-1, 3)


def sdf_extents(obj):
    """AABB of the object measured from its SDF on a dense grid, as (lo, hi) within about one voxel.

    Two estimates per side, the more extreme wins: the extreme grid points inside (never beyond
    the true box, but short of thin tips and sharp edges such as the house's eaves), and the
    extreme grid points of the set {sdf <= r} less r (for an exact distance that set is the object
    grown by a ball of radius r, so it reaches a tip's surroundings). Half a voxel of padding
    centres the error."""
    r = 2 * VOXEL
    d = torch.cat([obj.sdf(chunk) for chunk in _GRID.split(200_000)])
    inside, grown = _GRID[d <= 0], _GRID[d <= r]
    assert inside.shape[0] > 100, obj.noun
    # nothing near the object touches the grid's border: the grid holds the whole object
    assert (grown.abs() < GRID_HALF).all(), obj.noun
    hi = torch.maximum(inside.max(dim=0).values, grown.max(dim=0).values - r) + VOXEL / 2
    lo = torch.minimum(inside.min(dim=0).values, grown.min(dim=0).values + r) - VOXEL / 2
    return lo, hi


def raw(obj, *xyz):
    """A point given in the SPEC's (uncentred) coordinates, as a (1, 3) centred point."""
    return torch.tensor([xyz], dtype=torch.float32) - torch.tensor(obj.offset)


def sdf_at(obj, *xyz) -> float:
    return float(obj.sdf(raw(obj, *xyz))[0])


def colour_at(obj, *xyz) -> tuple:
    return tuple(obj.colour(raw(obj, *xyz))[0].tolist())


def assert_rgb(actual, expected, atol=1e-6):
    assert len(actual) == 3
    for a, e in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, abs=atol), (actual, expected)


# ----------------------------------------------------------------------------- colours and vocab


def test_colour_tables_match_spec():
    assert COLOUR_NAMES == SPEC_COLOUR_ORDER
    for name, rgb in SPEC_COLOURS.items():
        assert_rgb(COLOURS[name], rgb)
    for name, rgb in SPEC_PARTS.items():
        assert_rgb(PART_COLOURS[name], rgb)
    assert COLOURABLE_NOUNS == SPEC_NOUN_ORDER
    assert set(NOUNS) == set(SPEC_NOUN_ORDER) | {"snowman", "tree", "hamburger"}
    assert len(NOUNS) == 16
    assert DEFAULT_COLOUR == {"mug": "white", "mushroom": "red", "table": "brown", "chair": "brown", "house": "white", "dumbbell": "gray"}


# ----------------------------------------------------------------------------- geometry


def test_all_objects_one_per_noun():
    objs = all_objects()
    assert [o.noun for o in objs] == list(NOUNS)


@pytest.mark.parametrize("noun", NOUNS)
def test_object_centred_with_spec_extents(noun):
    obj = next(o for o in all_objects() if o.noun == noun)
    lo, hi = sdf_extents(obj)
    centre = (lo + hi) / 2
    assert centre.abs().max() <= 1.5 * VOXEL, (noun, centre.tolist())
    ext = hi - lo
    expected = torch.tensor(SPEC_EXTENTS[noun])
    assert torch.allclose(ext, expected, atol=1.5 * VOXEL), (noun, ext.tolist(), expected.tolist())
    # the analytic bounds() agrees with the SDF (exact: it is what the centring used)
    blo, bhi = obj.bounds()
    assert torch.allclose(bhi - blo, expected, atol=1e-5)
    assert torch.allclose(blo + bhi, torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("noun", COLOURABLE_NOUNS)
def test_coloured_objects_centred(noun):
    # geometry does not depend on the colour: same offset and parts for every colour ...
    ref = build_object(noun, "red")
    for c in COLOUR_NAMES:
        obj = build_object(noun, c)
        assert obj.noun == noun
        assert obj.offset == pytest.approx(ref.offset)
        assert obj.parts == ref.parts
    # ... and, measured from the SDF of a non-default colour, the box is centred
    colour = "cyan" if DEFAULT_COLOUR.get(noun) != "cyan" else "pink"
    lo, hi = sdf_extents(build_object(noun, colour))
    assert ((lo + hi) / 2).abs().max() <= 1.5 * VOXEL
    assert torch.allclose(hi - lo, torch.tensor(SPEC_EXTENTS[noun]), atol=1.5 * VOXEL)


def test_build_object_argument_rules():
    with pytest.raises(ValueError):
        build_object("cube")  # a primitive needs a colour
    with pytest.raises(ValueError):
        build_object("cube", "teal")
    with pytest.raises(ValueError):
        build_object("spaceship", "red")
    # defaults and fixed colours
    assert build_object("mug").colours == build_object("mug", "white").colours
    assert build_object("snowman", "red").colours == build_object("snowman").colours


def test_sdf_signs_and_exact_distances():
    sphere = build_object("sphere", "red")
    assert sdf_at(sphere, 0, 0, 0) == pytest.approx(-0.42, abs=1e-6)
    assert sdf_at(sphere, 0, 0, 1.0) == pytest.approx(0.58, abs=1e-6)
    assert sdf_at(sphere, 0.3, 0.4, 0) == pytest.approx(0.08, abs=1e-6)
    assert sdf_at(sphere, -0.1, 0.2, -0.2) == pytest.approx(0.3 - 0.42, abs=1e-6)
    assert sdf_at(sphere, 5, 5, 5) > 0

    cube = build_object("cube", "red")
    assert sdf_at(cube, 0, 0, 0) == pytest.approx(-0.35, abs=1e-6)
    # corner direction: 0.1 past the corner in each axis -> 0.1 * sqrt(3)
    assert sdf_at(cube, 0.45, 0.45, 0.45) == pytest.approx(0.1 * math.sqrt(3), abs=1e-6)
    assert sdf_at(cube, -0.45, 0.45, -0.45) == pytest.approx(0.1 * math.sqrt(3), abs=1e-6)
    assert sdf_at(cube, 0.5, 0, 0) == pytest.approx(0.15, abs=1e-6)
    assert sdf_at(cube, 0.3, 0.1, 0) == pytest.approx(-0.05, abs=1e-6)

    cyl = build_object("cylinder", "red")
    assert sdf_at(cyl, 0.5, 0, 0) == pytest.approx(0.2, abs=1e-6)
    assert sdf_at(cyl, 0, 0, 0.5) == pytest.approx(0.1, abs=1e-6)
    assert sdf_at(cyl, 0.4, 0, 0.5) == pytest.approx(math.sqrt(0.02), abs=1e-6)
    assert sdf_at(cyl, 0, 0, 0) == pytest.approx(-0.3, abs=1e-6)

    torus = build_object("torus", "red")
    assert sdf_at(torus, 0.33, 0, 0) == pytest.approx(-0.13, abs=1e-6)
    assert sdf_at(torus, 0, 0, 0) == pytest.approx(0.20, abs=1e-6)
    assert sdf_at(torus, 0, 0.33, 0.5) == pytest.approx(0.37, abs=1e-6)

    capsule = build_object("capsule", "red")
    assert sdf_at(capsule, 0, 0, 0.6) == pytest.approx(0.13, abs=1e-6)
    assert sdf_at(capsule, 0.3, 0, 0.1) == pytest.approx(0.08, abs=1e-6)

    cone = build_object("cone", "red")
    assert sdf_at(cone, 0, 0, 0.5) == pytest.approx(0.1, abs=1e-6)  # above the apex
    assert sdf_at(cone, 0, 0, -0.5) == pytest.approx(0.1, abs=1e-6)  # below the base
    assert sdf_at(cone, 0, 0, 0) < 0


def test_pyramid_sdf_exact_above_and_beside():
    pyr = build_object("pyramid", "red")
    assert pyr.offset == pytest.approx((0.0, 0.0, 0.0))
    assert sdf_at(pyr, 0, 0, 0.375 + 0.1) == pytest.approx(0.1, abs=1e-5)  # above the apex
    # off the middle of the +X face along its outward normal (2, 0, 1)/sqrt(5)
    n = torch.tensor([2.0, 0.0, 1.0]) / math.sqrt(5)
    p = torch.tensor([0.1875, 0.0, 0.0]) + 0.1 * n
    assert sdf_at(pyr, *p.tolist()) == pytest.approx(0.1, abs=1e-5)
    p = torch.tensor([0.0, -0.1875, 0.0]) + 0.05 * torch.tensor([0.0, -2.0, 1.0]) / math.sqrt(5)
    assert sdf_at(pyr, *p.tolist()) == pytest.approx(0.05, abs=1e-5)
    # inside: distance to the nearest face plane 2x + z = 0.375 is 0.375 / sqrt(5)
    assert sdf_at(pyr, 0, 0, 0) == pytest.approx(-0.375 / math.sqrt(5), abs=1e-5)
    # beyond a base corner, (0.1, 0.1, -0.1) from it: distance 0.1 * sqrt(3)
    assert sdf_at(pyr, 0.475, 0.475, -0.475) == pytest.approx(0.1 * math.sqrt(3), abs=1e-5)
    assert sdf_at(pyr, 0, 0, -0.5) > 0
    assert sdf_at(pyr, 0.3, 0.3, 0.3) > 0


def test_pyramid_sdf_exact_at_the_base():
    pyr = build_object("pyramid", "red")
    assert sdf_at(pyr, 0, 0, -0.375 - 0.1) == pytest.approx(0.1, abs=1e-5)  # under the base
    assert sdf_at(pyr, 0, 0, -0.376) == pytest.approx(0.001, abs=1e-5)
    assert sdf_at(pyr, 0.2, -0.1, -0.375 - 0.05) == pytest.approx(0.05, abs=1e-5)
    assert sdf_at(pyr, 0, 0, -0.375 + 0.02) == pytest.approx(-0.02, abs=1e-5)  # inside, nearest the base


@pytest.mark.parametrize("noun", ["sphere", "cube", "cylinder", "cone", "torus", "capsule", "table", "chair", "house", "dumbbell", "snowman"])
def test_sdf_is_a_distance_bound(noun):
    """|sdf(p) - sdf(q)| <= |p - q| (1-Lipschitz) on random pairs: what sphere tracing relies on."""
    obj = next(o for o in all_objects() if o.noun == noun)
    g = torch.Generator().manual_seed(0)
    p = (torch.rand(4000, 3, generator=g) - 0.5) * 1.6
    q = p + torch.randn(4000, 3, generator=g) * 0.05
    lhs = (obj.sdf(p) - obj.sdf(q)).abs()
    rhs = (p - q).norm(dim=-1)
    assert (lhs <= rhs + 1e-5).all()


# ----------------------------------------------------------------------------- orientation


def test_mug_handle_on_plus_y():
    mug = build_object("mug", "white")
    # the handle ring (axis X, centre (0, 0.31, 0), major 0.12): its outermost and top points
    assert sdf_at(mug, 0, 0.43, 0) < 0
    assert sdf_at(mug, 0, 0.31, 0.12) < 0
    assert sdf_at(mug, 0, 0.31, -0.12) < 0
    # mirrored to -Y (about the body's axis): empty
    assert sdf_at(mug, 0, -0.43, 0) > 0
    assert sdf_at(mug, 0, -0.31, 0.12) > 0
    # and nothing of the handle at +-X
    assert sdf_at(mug, 0.31, 0, 0.12) > 0
    assert sdf_at(mug, -0.31, 0, 0.12) > 0
    # in centred coordinates the handle's tip is near y = +0.715/2
    lo, hi = mug.bounds()
    assert float(hi[1]) == pytest.approx(0.3575, abs=1e-5)


def test_chair_backrest_on_minus_x():
    chair = build_object("chair", "brown")
    assert sdf_at(chair, -0.22, 0, 0.8) < 0
    assert sdf_at(chair, 0.22, 0, 0.8) > 0
    assert sdf_at(chair, 0, 0.22, 0.8) > 0
    assert sdf_at(chair, 0, -0.22, 0.8) > 0
    assert sdf_at(chair, 0, 0, 0.43) < 0  # the seat


def test_snowman_nose_on_plus_x():
    snow = build_object("snowman")
    assert sdf_at(snow, 0.20, 0, 0.64) < 0
    assert sdf_at(snow, -0.20, 0, 0.64) > 0
    assert sdf_at(snow, 0, 0.20, 0.64) > 0
    assert_rgb(colour_at(snow, 0.20, 0, 0.64), SPEC_COLOURS["orange"])
    # eyes on the front too, black
    assert_rgb(colour_at(snow, 0.115 + 0.02, 0.05, 0.68), SPEC_COLOURS["black"])
    assert_rgb(colour_at(snow, 0.26, 0, 0), SPEC_COLOURS["white"])


def test_house_door_on_plus_x():
    house = build_object("house", "blue")
    assert sdf_at(house, 0.315, 0, 0.1) < 0
    assert sdf_at(house, -0.315, 0, 0.1) > 0
    assert sdf_at(house, 0, 0.315, 0.1) < 0  # walls reach y = 0.35 ...
    assert sdf_at(house, 0, 0.36, 0.1) > 0  # ... but no door there
    assert_rgb(colour_at(house, 0.315, 0, 0.1), SPEC_PARTS["door"])
    assert_rgb(colour_at(house, 0.325, 0.0, 0.13), SPEC_PARTS["door"])
    assert_rgb(colour_at(house, -0.30, 0, 0.2), SPEC_COLOURS["blue"])  # back wall
    assert_rgb(colour_at(house, 0, 0, 0.75), SPEC_PARTS["roof"])  # ridge
    assert_rgb(colour_at(house, 0.30, 0.2, 0.2), SPEC_COLOURS["blue"])  # front wall beside the door


# ----------------------------------------------------------------------------- colour rule


def test_mushroom_colours():
    mush = build_object("mushroom", "blue")
    assert_rgb(colour_at(mush, 0.11, 0, 0.15), SPEC_COLOURS["white"])  # stem surface
    assert_rgb(colour_at(mush, 0, 0, 0.2), SPEC_COLOURS["white"])  # inside the stem
    assert_rgb(colour_at(mush, 0, 0, 0.71), SPEC_COLOURS["blue"])  # top of the cap
    assert_rgb(colour_at(mush, 0.3, 0, 0.35 + math.sqrt(0.36**2 - 0.3**2)), SPEC_COLOURS["blue"])
    default = build_object("mushroom")
    assert_rgb(colour_at(default, 0, 0, 0.71), SPEC_COLOURS["red"])
    assert_rgb(colour_at(default, 0.11, 0, 0.15), SPEC_COLOURS["white"])


def test_hamburger_colours():
    bur = build_object("hamburger")
    assert_rgb(colour_at(bur, 0.40, 0, 0.06), SPEC_PARTS["tan"])  # bottom bun
    assert_rgb(colour_at(bur, 0.42, 0, 0.17), SPEC_PARTS["patty"])
    assert_rgb(colour_at(bur, 0.44, 0, 0.24), SPEC_PARTS["leaf"])  # lettuce
    assert_rgb(colour_at(bur, 0, 0, 0.46), SPEC_PARTS["tan"])  # top bun
    assert_rgb(colour_at(bur, 0, 0, 0.0), SPEC_PARTS["tan"])  # bottom


def test_tree_colours():
    tree = build_object("tree")
    assert_rgb(colour_at(tree, 0.07, 0, 0.1), SPEC_PARTS["bark"])
    assert_rgb(colour_at(tree, 0, 0, 0.95), SPEC_PARTS["leaf"])


@pytest.mark.parametrize("noun", PRIMITIVES + ("mug", "table", "chair", "dumbbell"))
def test_single_colour_objects_are_all_c(noun):
    for c in ("red", "cyan"):
        obj = build_object(noun, c)
        for rgb in obj.colours:
            assert_rgb(rgb, SPEC_COLOURS[c])


# ----------------------------------------------------------------------------- held-out pairs


@pytest.mark.parametrize("colour, noun, held", [
    ("green", "cube", True),  # 3*1 + 0 + 4 = 7
    ("blue", "torus", True),  # 3*2 + 4 + 4 = 14
    ("red", "chair", True),  # 0 + 10 + 4 = 14
    ("red", "cone", True),  # 0 + 3 + 4 = 7
    ("cyan", "dumbbell", True),  # 33 + 12 + 4 = 49
    ("red", "cube", False),  # 4
    ("white", "mug", False),  # 21 + 7 + 4 = 32
    ("blue", "sphere", False),  # 6 + 1 + 4 = 11
    ("brown", "chair", False),  # 30 + 10 + 4 = 44
    ("white", "snowman", False),  # fixed colours have no pairs
])
def test_is_held_out(colour, noun, held):
    assert is_held_out(colour, noun) is held


def test_held_out_pairs_match_formula():
    expected = {(c, n) for ci, c in enumerate(SPEC_COLOUR_ORDER) for ni, n in enumerate(SPEC_NOUN_ORDER)
                if (3 * ci + ni + 4) % 7 == 0}
    assert set(HELD_OUT_PAIRS) == expected
    assert len(HELD_OUT_PAIRS) == len(expected) == 23
    for c, n in HELD_OUT_PAIRS:
        assert is_held_out(c, n)
    # the benchmark's held-out prompts
    assert {("green", "cube"), ("blue", "torus"), ("red", "chair")} <= set(HELD_OUT_PAIRS)
    # no default colour is held out
    for n, c in DEFAULT_COLOUR.items():
        assert not is_held_out(c, n)


# ----------------------------------------------------------------------------- draws and captions


BACKGROUND_PHRASE = " on a white background"


def _colour_words(text):
    """Colour words naming the object (the template's 'on a white background' names none)."""
    return [w for w in re.findall(r"[a-z]+", text.replace(BACKGROUND_PHRASE, "")) if w in COLOURS]


def test_draw_example_never_held_out():
    rng = random.Random(0)
    nouns, named, coloured = set(), 0, 0
    colours_seen = {n: set() for n in COLOURABLE_NOUNS}
    for _ in range(20000):
        d = draw_example(rng)
        assert d.noun in NOUNS
        nouns.add(d.noun)
        assert d.noun in d.phrase
        words = _colour_words(d.phrase)
        if d.noun in FIXED_COMPOSITES:
            assert d.colour is None
            assert words == []
            continue
        assert d.colour in COLOURS
        assert not is_held_out(d.colour, d.noun), d
        colours_seen[d.noun].add(d.colour)
        coloured += 1
        if words:
            named += 1
            assert words == [d.colour], d  # the colour word is the object's colour, once
        assert re.search(r"\ba [aeiou]", d.phrase) is None, d.phrase  # 'an orange', not 'a orange'
    assert nouns == set(NOUNS)
    # most colourable draws name their colour (the SPEC's templates), not all
    assert 0.6 < named / coloured < 0.95
    # every allowed colour shows up for every noun
    for n, seen in colours_seen.items():
        assert seen == {c for c in COLOUR_NAMES if not is_held_out(c, n)}, n


def test_draw_example_deterministic():
    a = [draw_example(random.Random(42)) for _ in range(1)] + [draw_example(r) for r in [random.Random(1)] * 50]
    b = [draw_example(random.Random(42)) for _ in range(1)] + [draw_example(r) for r in [random.Random(1)] * 50]
    assert a == b


def test_asymmetric_fraction_shares_and_keeps_the_stream():
    """At 0 the draws are exactly those of the plain call; at f the asymmetric objects' share is
    f + (1 - f) 4/16 (0.625 at f = 0.5), still never a held-out pair."""
    assert [draw_example(random.Random(7), asymmetric_fraction=0.0) for _ in range(1)] == [draw_example(random.Random(7))]
    plain, zero = random.Random(3), random.Random(3)
    assert [draw_example(plain) for _ in range(200)] == [draw_example(zero, asymmetric_fraction=0.0) for _ in range(200)]
    rng = random.Random(0)
    draws = [draw_example(rng, synonyms=True, asymmetric_fraction=0.5) for _ in range(8000)]
    share = sum(d.noun in ASYMMETRIC_NOUNS for d in draws) / len(draws)
    assert abs(share - (0.5 + 0.5 * len(ASYMMETRIC_NOUNS) / len(NOUNS))) < 0.02
    assert {d.noun for d in draws} == set(NOUNS)
    assert not any(d.colour is not None and is_held_out(d.colour, d.noun) for d in draws)
    rng = random.Random(0)
    assert all(draw_example(rng, asymmetric_fraction=1.0).noun in ASYMMETRIC_NOUNS for _ in range(500))


def test_uncoloured_composite_uses_default_colour():
    rng = random.Random(0)
    for _ in range(5000):
        d = draw_example(rng)
        if d.noun in COLOURED_COMPOSITES and not _colour_words(d.phrase):
            assert d.colour == DEFAULT_COLOUR[d.noun], d


def test_captions_never_hold_held_out_words():
    rng = random.Random(0)
    for _ in range(20000):
        d = draw_example(rng)
        words = set(re.findall(r"[a-z]+", d.phrase))
        for c, n in HELD_OUT_PAIRS:
            assert not (c in words and n in words), d


@pytest.mark.parametrize("az, el, label", [
    (0.0, 0.0, "front view"), (45.0, 10.0, "front view"), (90.0, 0.0, "side view"), (180.0, 59.9, "back view"),
    (200.0, 60.0, "overhead view"), (315.1, -10.0, "front view"), (134.9, 20.0, "side view"),
])
def test_caption_ends_with_view_label(az, el, label):
    assert caption("a red cube", az, el) == f"a red cube, {label}"
    assert caption("a snowman", az, el).endswith(", " + view_label(az, el))


# ----------------------------------------------------------------------------- renders


@pytest.fixture(scope="module")
def batch():
    return render_batch(8, 32, random.Random(0), torch.Generator().manual_seed(0))


def test_render_batch_images(batch):
    imgs = batch.images
    assert imgs.shape == (8, 3, 32, 32)
    assert torch.isfinite(imgs).all()
    assert imgs.min() >= 0 and imgs.max() <= 1
    for k in range(8):
        for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert (imgs[k, :, r, c] == BACKGROUND).all(), (k, r, c)
        assert BACKGROUND == 1.0
        nonwhite = (imgs[k] < 0.99).any(dim=0).sum()
        assert nonwhite >= 20, (k, int(nonwhite))


def test_render_batch_captions(batch):
    assert len(batch.captions) == len(batch.nouns) == len(batch.colours) == len(batch.modes) == 8
    for k in range(8):
        label = view_label(float(batch.cameras.azimuth[k]), float(batch.cameras.elevation[k]))
        assert batch.captions[k].endswith(", " + label)
        assert batch.nouns[k] in batch.captions[k]
        c, n = batch.colours[k], batch.nouns[k]
        assert c is None or not is_held_out(c, n)
        assert batch.modes[k] in ("lit", "textureless", "albedo")


def test_render_batch_many_never_held_out():
    b = render_batch(24, 8, random.Random(3), torch.Generator().manual_seed(3), supersample=1)
    for c, n, cap in zip(b.colours, b.nouns, b.captions, strict=True):
        assert c is None or not is_held_out(c, n)
        for w in _colour_words(cap):
            assert not is_held_out(w, n)


def test_render_batch_on_random_backgrounds():
    """A fraction of the images stand on a random solid colour (Batch.backgrounds): exactly that
    colour where no ray hits, the same object pixels as on white where every ray hits, and the
    coverage channel does not depend on the background."""
    b = render_batch(16, 16, random.Random(5), torch.Generator().manual_seed(5), with_alpha=True, random_background=0.5)
    white = (b.backgrounds == 1).all(dim=1)
    assert 3 <= int(white.sum()) <= 13  # about half of 16
    for k in range(16):
        empty = b.images[k, 3] == 0
        assert empty.sum() > 50
        assert torch.allclose(b.images[k, :3][:, empty], b.backgrounds[k][:, None].expand(3, int(empty.sum())))
    # the same cameras and colours on white: object pixels equal, empty ones white
    obj = build_object("mug", "white")
    cams = make_cameras(torch.tensor([30.0, 200.0]), 20.0, 1.9, 1.27)
    lights = default_light(cams)
    bg = torch.tensor([[0.1, 0.5, 0.9], [0.8, 0.2, 0.0]])
    on_colour = render_object(obj, cams, lights, ["lit", "textureless"], 24, with_alpha=True, backgrounds=bg)
    on_white = render_object(obj, cams, lights, ["lit", "textureless"], 24, with_alpha=True)
    assert torch.equal(on_colour[:, 3], on_white[:, 3])
    full = on_white[:, 3:] == 1
    assert torch.allclose(on_colour[:, :3] * full, on_white[:, :3] * full)
    # partly covered pixels mix the object and the background by their coverage
    a = on_white[:, 3:]
    assert torch.allclose(on_colour[:, :3], on_white[:, :3] + (1 - a) * (bg[:, :, None, None] - 1), atol=1e-5)


def test_render_batch_on_white_draws_no_background():
    """The white-only recipe (v1, v2 before step 2,500) keeps its random stream: the same batch
    with or without the background machinery."""
    one = render_batch(6, 8, random.Random(2), torch.Generator().manual_seed(2), supersample=1)
    two = render_batch(6, 8, random.Random(2), torch.Generator().manual_seed(2), supersample=1, random_background=0.0)
    assert torch.equal(one.images, two.images) and torch.equal(one.cameras.azimuth, two.cameras.azimuth)
    assert (one.backgrounds == 1).all()


def _front_red_cube(mode, size=33):
    cams = make_cameras(0.0, 0.0, 2.0, 1.0)
    lights = default_light(cams)  # at the camera, intensity 0.75, ambient 0.2
    img = render_object(build_object("cube", "red"), cams, lights, [mode], size)
    return img[0, :, size // 2, size // 2]


def test_render_red_cube_albedo():
    assert_rgb(_front_red_cube("albedo").tolist(), SPEC_COLOURS["red"], atol=0.02)


def test_render_red_cube_textureless_is_gray():
    px = _front_red_cube("textureless")
    assert float(px.max() - px.min()) < 1e-3
    # face normal +X, light at the camera on +X: cos ~ 1 -> 0.75 + 0.2
    assert float(px.mean()) == pytest.approx(0.95, abs=0.01)


def test_render_red_cube_lit():
    px = _front_red_cube("lit")
    assert_rgb(px.tolist(), [0.95 * v for v in SPEC_COLOURS["red"]], atol=0.01)


def test_render_object_views_show_orientation():
    """From the front (+X) the mug's handle (+Y) is on the image's right, so the heavy body is on
    the left; from the back it is the other way round."""
    mug = build_object("mug", "black")
    cams = make_cameras(torch.tensor([0.0, 180.0]), 0.0, 2.0, 1.0)
    img = render_object(mug, cams, default_light(cams), ["albedo", "albedo"], 32)
    cols = torch.arange(32, dtype=torch.float32) + 0.5
    centroid = []
    for k in range(2):
        dark = 1.0 - img[k].mean(0)  # (H, W): coverage of the black mug
        centroid.append(float((dark.sum(0) * cols).sum() / dark.sum()))
    # body centred at y = -0.1075 in centred coordinates: ~1.7 px left of the centre at this zoom
    assert centroid[0] < 16.0 - 0.5
    assert centroid[1] > 16.0 + 0.5
    assert centroid[0] + centroid[1] == pytest.approx(32.0, abs=0.5)  # mirror images


# ----------------------------------------------------------------------------- captions in other words (prior v2)


def test_synonym_captions_name_the_drawn_object_and_never_a_held_out_pair():
    from dreamfusion.prior.world import COLOUR_WORDS, MATERIAL_WORDS, NOUN_WORDS, parse_prompt

    rng = random.Random(5)
    synonyms_seen, materials_seen = 0, 0
    for _ in range(20000):
        d = draw_example(rng, synonyms=True)
        assert not (d.colour and is_held_out(d.colour, d.noun)), d
        noun, colour = parse_prompt(d.phrase)
        assert noun == d.noun, d  # the phrase names its object, whichever word it uses
        if colour is not None:
            assert colour == d.colour, d
        synonyms_seen += not any(re.search(rf"\b{n}\b", d.phrase) for n in NOUNS)
        materials_seen += any(m in d.phrase for ms in MATERIAL_WORDS.values() for m in ms)
        for c, n in HELD_OUT_PAIRS:  # no held-out pair in any wording
            assert not (any(w in d.phrase for w in COLOUR_WORDS[c]) and any(re.search(rf"\b{w}\b", d.phrase) for w in NOUN_WORDS[n])
                        and d.colour == c and d.noun == n), d
    assert 0.15 < synonyms_seen / 20000 < 0.5
    assert materials_seen > 100


@pytest.mark.parametrize("prompt, noun, colour", [
    ("a crimson box", "cube", "red"), ("a wooden chair", "chair", "brown"), ("a chair made of wood", "chair", "brown"),
    ("a silver ball", "sphere", "gray"), ("a Snowman", "snowman", None), ("a coffee mug, white", "mug", "white"),
    ("a fir tree, side view", "tree", None), ("an emerald-green donut", "torus", "green"), ("a red cube", "cube", "red"),
    ("a squirrel", None, None), ("a blue sphere on a plain background", "sphere", "blue"),
])
def test_parse_prompt_with_synonyms(prompt, noun, colour):
    from dreamfusion.prior.world import parse_prompt

    assert parse_prompt(prompt) == (noun, colour)


def test_render_with_alpha_and_part_colours():
    from dreamfusion.cameras import make_cameras

    cams = make_cameras([30.0, 110.0], [20.0, 35.0], 1.9, 1.27)
    cube = build_object("cube", "red")
    out = render_object(cube, cams, default_light(cams), ["albedo", "albedo"], 32, with_alpha=True)
    assert out.shape == (2, 4, 32, 32)
    alpha = out[:, 3]
    assert float(alpha[:, 16, 16].min()) == 1.0 and float(alpha[:, 0, 0].max()) == 0.0
    assert ((alpha > 0) & (alpha < 1)).any()  # antialiased edges
    rgb = render_object(cube, cams, default_light(cams), ["albedo", "albedo"], 32)
    assert torch.equal(out[:, :3], rgb)  # the colour channels are the plain render
    # composited over white: a pixel is alpha * colour + (1 - alpha) * white
    red = torch.tensor(COLOURS["red"]).view(3, 1)
    edge = (alpha > 0) & (alpha < 1)
    expected = alpha[edge] * red + (1 - alpha[edge])
    assert torch.allclose(out[:, :3].permute(1, 0, 2, 3)[:, edge], expected, atol=1e-5)
    blue = torch.tensor(COLOURS["blue"]).view(1, 1, 3).expand(2, 1, 3)
    recoloured = render_object(cube, cams, default_light(cams), ["albedo", "albedo"], 32, part_colours=blue)
    assert torch.allclose(recoloured[:, :, 16, 16], blue[:, 0], atol=1e-6)
