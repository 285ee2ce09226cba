"""The measures of a clean asset (dreamfusion.metrics.surface_measures, colour_noise) on analytic
meshes whose answers are known by hand: a sphere at a known offset, a cube turned by a known
angle, colours with a known noise."""

import numpy as np
import pytest
import torch
import trimesh

from dreamfusion.metrics import (
    angle_degrees,
    colour_noise,
    face_normals,
    project_to_surface,
    surface_measures,
    surface_samples,
    true_mesh,
    vertex_areas,
    weighted_std,
)
from dreamfusion.prior.world import build_object

SPHERE_RADIUS = 0.42  # SPEC: sphere, radius 0.42
CUBE_SIDE = 0.70  # SPEC: cube, (-0.35, -0.35, -0.35)..(0.35, 0.35, 0.35)


def _sphere_mesh(radius: float) -> trimesh.Trimesh:
    """An icosphere with 20,480 faces, its vertices on the sphere of ``radius``."""
    return trimesh.creation.icosphere(subdivisions=5, radius=radius)


def test_face_normals_and_areas_by_hand():
    vertices = np.array([[0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 3]], dtype=float)
    normals, areas = face_normals(vertices, np.array([[0, 1, 2], [0, 2, 3], [0, 1, 1]]))
    assert np.allclose(normals, [[0, 0, 1], [1, 0, 0], [0, 0, 0]])  # counter-clockwise from +Z: +Z; the last is degenerate
    assert np.allclose(areas, [1.0, 1.5, 0.0])
    # a vertex stands for a third of each face it is on
    assert np.allclose(vertex_areas(vertices, np.array([[0, 1, 2], [0, 2, 3]])), [2.5 / 3, 1 / 3, 2.5 / 3, 0.5])


def test_angle_degrees_by_hand():
    a = np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    b = np.array([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0], [np.sin(np.pi / 6), 0, np.cos(np.pi / 6)]])
    assert np.allclose(angle_degrees(a, b), [0.0, 90.0, 180.0, 30.0])


def test_weighted_std_by_hand():
    # values 0 and 2 in one channel, equal weights: mean 1, every deviation 1
    assert weighted_std(np.array([[0.0], [2.0]]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    # weights 3 and 1: mean 0.5, variance (3 * 0.25 + 1 * 2.25) / 4 = 0.75
    assert weighted_std(np.array([[0.0], [2.0]]), np.array([3.0, 1.0])) == pytest.approx(np.sqrt(0.75))
    # two channels, one constant: the mean over channels of the variances (1 and 0) is 0.5
    assert weighted_std(np.array([[0.0, 5.0], [2.0, 5.0]]), np.array([1.0, 1.0])) == pytest.approx(np.sqrt(0.5))
    assert weighted_std(np.zeros((0, 3)), np.zeros(0)) == 0.0


def test_samples_are_uniform_by_area_and_seeded():
    # two unit squares' worth of triangles, one of area 1 and one of area 3 (disjoint): a quarter of the samples on the first
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [5, 0, 0], [8, 0, 0], [5, 2, 0]], dtype=float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    points, face = surface_samples(vertices, faces, count=40000, seed=3)
    assert (face == 0).mean() == pytest.approx(0.25, abs=0.01)
    # inside the first triangle (x >= 0, y >= 0, x + y / 2 <= 1) and its centroid on average
    first = points[face == 0]
    assert (first[:, 0] >= 0).all() and (first[:, 1] >= 0).all() and (first[:, 0] + first[:, 1] / 2 <= 1 + 1e-12).all()
    assert np.allclose(first.mean(axis=0), [1 / 3, 2 / 3, 0], atol=0.01)
    again, _ = surface_samples(vertices, faces, count=40000, seed=3)
    assert np.array_equal(points, again)
    with pytest.raises(ValueError, match="no surface"):
        surface_samples(np.zeros((3, 3)), np.array([[0, 1, 2]]))


@pytest.mark.parametrize("offset", [0.0, 0.01, -0.02])
def test_sphere_at_a_known_offset(offset):
    """A sphere mesh `offset` larger than the true sphere is `offset` from it everywhere, and its
    faces face the way the true surface does."""
    obj = build_object("sphere", "red")
    m = surface_measures(_sphere_mesh(SPHERE_RADIUS + offset), obj)
    assert m["surface_distance"] == pytest.approx(abs(offset), abs=1.5e-4)  # the flat faces sag 8e-5 inside on average
    assert m["normal_error_median"] < 1.0 and m["normal_error_p90"] < 1.5  # the icosphere's flat faces tilt by about a degree at most
    assert m["faces"] == 20480


def test_the_mesh_is_centred_before_scoring():
    obj = build_object("sphere", "red")
    moved = _sphere_mesh(SPHERE_RADIUS)
    moved.apply_translation([0.3, -0.2, 0.1])  # the benchmark centres the mesh's bounding box, so this costs nothing
    assert surface_measures(moved, obj)["surface_distance"] < 1.5e-4


def test_inside_out_sphere_has_every_normal_wrong():
    obj = build_object("sphere", "red")
    flipped = _sphere_mesh(SPHERE_RADIUS)
    flipped.invert()
    assert surface_measures(flipped, obj)["normal_error_median"] > 179.0


def test_cube_normals_and_a_cube_turned_by_a_known_angle():
    obj = build_object("cube", "red")
    box = trimesh.creation.box(extents=(CUBE_SIDE,) * 3)
    m = surface_measures(box, obj)
    assert m["surface_distance"] < 1e-9
    assert m["normal_error_median"] < 1e-6 and m["normal_error_p90"] < 1e-6
    assert m["faces"] == 12
    # turned 10 degrees about +Z: the four sides' normals are 10 degrees off (two thirds of the area),
    # top and bottom are not (a third), so the median is the turn
    turned = box.copy()
    turned.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(10.0), [0, 0, 1]))
    m = surface_measures(turned, obj)
    assert m["normal_error_median"] == pytest.approx(10.0, abs=0.01)
    assert m["surface_distance"] > 0.01


@pytest.mark.parametrize("noun, colour", [("cube", "red"), ("torus", "blue"), ("house", None)])
def test_the_truths_own_mesh_is_clean(noun, colour):
    """The truth's own mesh: on the surface (the torus's inner crevice is not filled), its normals
    right, and each part one colour (a vertex on the boundary of two parts is no part's noise)."""
    obj = build_object(noun, colour)
    m = surface_measures(true_mesh(obj, 96), obj)
    assert m["surface_distance"] < 1e-3 and m["normal_error_median"] < 1.5 and m["normal_error_p90"] < 3.0
    assert m["colour_noise"] == pytest.approx(0.0, abs=1e-9)


def test_colour_noise_leaves_out_part_boundaries():
    obj = build_object("house")  # white walls, a dark roof and door: their boundaries' vertices take either colour
    mesh = true_mesh(obj, 128)
    assert colour_noise(mesh, obj, margin=0.0) > 0.01
    assert colour_noise(mesh, obj) == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def hamburger():
    """The hamburger's own mesh (four parts: bun, patty, lettuce, bun) with each vertex's true part
    and colour, and each part's area."""
    obj = build_object("hamburger")
    mesh = true_mesh(obj, 64)
    with torch.no_grad():
        surface = project_to_surface(obj, torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float64)))
        part = obj.nearest_part(surface).numpy()
        colour = obj.colour(surface).numpy()
    return obj, mesh, part, colour


def _coloured(mesh: trimesh.Trimesh, rgb: np.ndarray) -> trimesh.Trimesh:
    out = mesh.copy()
    out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=np.concatenate(
        [np.round(np.clip(rgb, 0, 1) * 255), np.full((len(rgb), 1), 255.0)], axis=1).astype(np.uint8))
    return out


def test_colour_noise_of_flat_parts_is_zero_and_known_noise_is_found(hamburger):
    obj, mesh, part, colour = hamburger
    assert colour_noise(_coloured(mesh, colour), obj) == pytest.approx(0.0, abs=1e-9)
    # every channel of every vertex off its part's colour by a normal noise of standard deviation 0.04
    # (the hamburger's colours lie in 0.08..0.85, so clipping to [0, 1] never bites)
    rng = np.random.default_rng(0)
    noisy = colour + rng.normal(0.0, 0.04, colour.shape)
    assert colour_noise(_coloured(mesh, noisy), obj) == pytest.approx(0.04, rel=0.05)
    # a constant shift of one part is an error of colour, not noise
    shifted = colour.copy()
    shifted[part == 1] += 0.1
    assert colour_noise(_coloured(mesh, shifted), obj) == pytest.approx(0.0, abs=2e-3)


def test_colour_noise_weights_parts_by_area(hamburger):
    obj, mesh, part, colour = hamburger
    areas = vertex_areas(mesh.vertices, mesh.faces)
    patty = part == 1
    rng = np.random.default_rng(1)
    noisy = colour.copy()
    noisy[patty] += rng.normal(0.0, 0.05, (patty.sum(), 3))  # noise on the patty only
    expected = 0.05 * areas[patty].sum() / areas.sum()
    assert 0.05 < areas[patty].sum() / areas.sum() < 0.5
    assert colour_noise(_coloured(mesh, noisy), obj) == pytest.approx(expected, rel=0.06)
