"""Mesh extraction and export (dreamfusion.export) on analytic density fields."""

import json
import struct

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

from dreamfusion.cameras import camera_rays
from dreamfusion.export import (
    SURFACE_DENSITY,
    composite_along_normals,
    decimate_mesh,
    density_gradient,
    distance_to_mesh,
    extract_mesh,
    linear_to_srgb,
    rasterize_triangles,
    refine_vertices,
    save_mesh,
    save_textured_glb,
    save_textured_obj,
    save_turntable,
    smooth_colours,
    smooth_surface,
    srgb_to_linear,
    to_y_up,
)

RADII = (0.4, 0.4, 0.6)  # an ellipsoid elongated along Z, so Z-up and Y-up files differ
RES, BOUND = 48, 1.0
VOXEL = 2 * BOUND / (RES - 1)
RED, BLUE = (0.85, 0.10, 0.10), (0.15, 0.30, 0.90)
RED8, BLUE8 = (217, 26, 26), (38, 76, 230)  # value x 255, rounded


def ellipsoid_density(p: torch.Tensor) -> torch.Tensor:
    r = (p / p.new_tensor(RADII)).norm(dim=-1)
    return torch.where(r < 1.0, 50.0, 0.0)


def red_blue_albedo(p: torch.Tensor) -> torch.Tensor:
    """Red where x > 0 (the front), blue behind."""
    return torch.where(p[:, :1] > 0, p.new_tensor(RED), p.new_tensor(BLUE))


@pytest.fixture(scope="module")
def mesh():
    return extract_mesh(ellipsoid_density, red_blue_albedo, resolution=RES, bound=BOUND)


def test_extract_size_watertight_and_outward(mesh):
    assert np.allclose(mesh.extents, [0.8, 0.8, 1.2], atol=VOXEL)
    assert np.allclose(mesh.bounds.mean(axis=0), 0.0, atol=VOXEL / 2)
    assert mesh.is_watertight
    assert mesh.volume > 0  # counter-clockwise seen from outside
    outward = (mesh.face_normals * mesh.triangles_center).sum(axis=1) > 0
    assert outward.mean() > 0.99
    assert abs(mesh.volume - 4 / 3 * np.pi * np.prod(RADII)) < 0.1 * mesh.volume


def test_vertex_colours_follow_albedo(mesh):
    colours = mesh.visual.vertex_colors
    assert colours.dtype == np.uint8 and colours.shape == (len(mesh.vertices), 4)
    red = (colours[:, :3] == RED8).all(axis=1)
    blue = (colours[:, :3] == BLUE8).all(axis=1)
    assert (red | blue).all() and (colours[:, 3] == 255).all()
    assert (mesh.vertices[red, 0] > 0).all() and (mesh.vertices[blue, 0] <= 0).all()
    assert 0.4 < red.mean() < 0.6


def test_composite_along_normals_by_hand():
    """A half-space x < 0 with a skin: density 10 and blue for -0.1 < x < 0, opaque (1e4) and red
    deeper; empty and green outside. Seen along +x's normal, the skin shows 1 - exp(-10 x 0.1) of
    blue over red; fog outside the surface (no density) shows nothing."""
    def density(p: torch.Tensor) -> torch.Tensor:
        x = p[:, 0]
        return torch.where(x >= 0, 0.0, torch.where(x > -0.1, 10.0, 1e4))

    def albedo(p: torch.Tensor) -> torch.Tensor:
        x = p[:, :1]
        green, blue, red = p.new_tensor((0.0, 1.0, 0.0)), p.new_tensor((0.0, 0.0, 1.0)), p.new_tensor((1.0, 0.0, 0.0))
        return torch.where(x >= 0, green, torch.where(x > -0.1, blue, red))

    points = np.array([[0.0, 0.3, -0.2], [0.0, -0.5, 0.1]], dtype=np.float32)
    normals = np.array([[1.0, 0.0, 0.0]] * 2, dtype=np.float32)
    rgb = composite_along_normals(density, albedo, points, normals, depth=0.3, samples=601)
    skin = 1 - np.exp(-10 * 0.1)
    assert np.allclose(rgb, [[1 - skin, 0.0, skin]] * 2, atol=0.01)
    # a ray that meets no density keeps the albedo at the point
    empty = composite_along_normals(lambda p: torch.zeros(len(p)), albedo, points, normals, depth=0.3)
    assert np.allclose(empty, [[0.0, 1.0, 0.0]] * 2)
    with pytest.raises(ValueError, match="depth"):
        composite_along_normals(density, albedo, points, normals, depth=0.0)


def test_floaters_dropped_and_large_parts_kept():
    def two_balls_and_a_speck(p):
        big = ((p - p.new_tensor([-0.4, 0, 0])).norm(dim=-1) < 0.3) | ((p - p.new_tensor([0.4, 0, 0])).norm(dim=-1) < 0.3)
        speck = (p - p.new_tensor([0.0, 0.7, 0.7])).norm(dim=-1) < 0.045
        return (big | speck).float() * 50

    m = extract_mesh(two_balls_and_a_speck, red_blue_albedo, resolution=RES)
    assert len(m.split(only_watertight=False)) == 2
    assert m.bounds[1, 1] < 0.4  # the speck near y = 0.7 is gone
    assert len(m.visual.vertex_colors) == len(m.vertices)


def test_threshold_rules():
    with pytest.warns(UserWarning, match="below the surface level"):
        m = extract_mesh(lambda p: ellipsoid_density(p) * 0.04, red_blue_albedo, resolution=32)  # peak 2 < 4.6
    assert np.allclose(m.extents, [0.8, 0.8, 1.2], atol=2 / 31)
    with pytest.raises(ValueError, match="density is empty: nothing to export"):
        extract_mesh(lambda p: torch.zeros(len(p)), red_blue_albedo, resolution=16)
    with pytest.raises(ValueError, match="density is empty"):
        extract_mesh(ellipsoid_density, red_blue_albedo, resolution=16, threshold=60.0)
    # an explicit level on a smooth field lands where the field crosses it
    smooth = extract_mesh(lambda p: 10 * (1 - p.norm(dim=-1)).clamp_min(0), red_blue_albedo, resolution=32, threshold=5.0)
    assert np.allclose(np.linalg.norm(smooth.vertices, axis=1), 0.5, atol=0.01)
    assert 2.0 < SURFACE_DENSITY < 50.0


def test_to_y_up_maps_z_to_y_and_keeps_front():
    m = trimesh.Trimesh([[1.0, 2.0, 3.0], [0, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False)
    assert np.allclose(to_y_up(m).vertices[0], [1.0, 3.0, -2.0])
    assert np.allclose(m.vertices[0], [1.0, 2.0, 3.0])  # a copy


def _glb_attributes(path):
    data = path.read_bytes()
    length = struct.unpack("<I", data[12:16])[0]
    gltf = json.loads(data[20:20 + length])
    return gltf["meshes"][0]["primitives"][0]["attributes"]


@pytest.mark.parametrize("suffix, extents", [(".glb", [0.8, 1.2, 0.8]), (".obj", [0.8, 0.8, 1.2]), (".ply", [0.8, 0.8, 1.2])])
def test_save_mesh_round_trip(mesh, tmp_path, suffix, extents):
    path = save_mesh(mesh, tmp_path / f"mesh{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mesh{suffix}"]  # no temporary file left
    back = trimesh.load(path, force="mesh")
    assert np.allclose(back.extents, extents, atol=VOXEL)
    vertices = back.vertices
    tolerance = 1
    if suffix == ".glb":  # the file's own arrays: COLOR_0 holds linear light (back to sRGB; 8-bit linear loses a little in the dark)
        tree, accessor, _ = read_glb(path)
        attributes = tree["meshes"][0]["primitives"][0]["attributes"]
        vertices, linear = accessor(attributes["POSITION"]), accessor(attributes["COLOR_0"])[:, :3]
        colours, tolerance = np.round(linear_to_srgb(linear / 255.0) * 255).astype(int), 3
    else:
        assert back.visual.kind == "vertex"
        colours = back.visual.vertex_colors[:, :3].astype(int)
    red = (np.abs(colours - RED8) <= tolerance).all(axis=1)
    blue = (np.abs(colours - BLUE8) <= tolerance).all(axis=1)
    assert (red | blue).all() and 0.4 < red.mean() < 0.6
    assert (vertices[red, 0] > 0).all()  # the front stays +X in every file


def test_the_glb_holds_linear_vertex_colours_and_a_matte_material(tmp_path):
    """glTF's COLOR_0 is linear light and its default material (a primitive without one) is fully
    metallic: the GLB stores sRGB 0.5 as linear 0.214 (by hand: ((0.5 + 0.055) / 1.055) ** 2.4) and
    names a non-metallic, fully rough material, so a viewer shows the albedo as the renders do."""
    assert srgb_to_linear(0.5) == pytest.approx(0.21404, abs=1e-5)
    assert srgb_to_linear(0.02) == pytest.approx(0.02 / 12.92)
    assert linear_to_srgb(srgb_to_linear(np.linspace(0, 1, 11))) == pytest.approx(np.linspace(0, 1, 11))
    m = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False,
                        vertex_colors=np.array([[128, 128, 128, 255], [255, 0, 0, 255], [0, 0, 255, 255]], dtype=np.uint8))
    tree, accessor, _ = read_glb(save_mesh(m, tmp_path / "mesh.glb"))
    primitive = tree["meshes"][0]["primitives"][0]
    material = tree["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert material["metallicFactor"] == 0.0 and material["roughnessFactor"] == 1.0
    colour = accessor(primitive["attributes"]["COLOR_0"])
    assert colour.dtype == np.uint8  # normalised: value / 255
    assert colour[:, :3].tolist() == [[55, 55, 55], [255, 0, 0], [0, 0, 255]]  # 128/255 sRGB -> 0.2159 linear -> 55


def test_save_mesh_refuses_unknown_suffix_and_failures_leave_nothing(mesh, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.glb, \.obj, \.ply"):
        save_mesh(mesh, tmp_path / "mesh.stl")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trimesh.Trimesh, "export", broken)
    with pytest.raises(RuntimeError):
        save_mesh(mesh, tmp_path / "mesh.ply")
    assert list(tmp_path.iterdir()) == []


def test_rasterize_counts_shared_edges_and_vertices_once():
    # a square split along its diagonal, every lattice point of the diagonal and edges in play
    verts = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0], [2.0, 2.0]])
    for faces in (np.array([[0, 1, 2], [0, 2, 3]]), np.array([[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]]),
                  np.array([[0, 2, 1], [0, 3, 2]])):  # clockwise triangles too
        face, i, j, bary = rasterize_triangles(verts, faces, (8, 8))
        inner = (i > 0) & (i < 4) & (j > 0) & (j < 4)
        hits = np.zeros((8, 8), dtype=int)
        np.add.at(hits, (i, j), 1)
        assert (hits[1:4, 1:4] == 1).all()
        assert hits.max() == 1 and inner.sum() == 9
        assert np.allclose(bary.sum(axis=1), 1) and (bary >= 0).all()
        assert np.allclose(np.einsum("kv,kvd->kd", bary, verts[faces[face]]), np.stack([i, j], 1))


def test_textured_obj(mesh, tmp_path):
    path = save_textured_obj(mesh, tmp_path / "textured.obj", texture_size=256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["textured.mtl", "textured.obj", "textured.png"]
    back = trimesh.load(path, force="mesh")
    assert isinstance(back.visual, trimesh.visual.TextureVisuals) and back.visual.uv.shape == (len(back.vertices), 2)
    assert np.allclose(back.extents, [0.8, 0.8, 1.2], atol=VOXEL)
    sampled = back.visual.to_color().vertex_colors[:, :3].astype(float)
    front = back.vertices[:, 0] > 0.1
    behind = back.vertices[:, 0] < -0.1
    assert np.abs(sampled[front] - RED8).mean() < 8
    assert np.abs(sampled[behind] - BLUE8).mean() < 8
    with pytest.raises(ValueError):
        save_textured_obj(mesh, tmp_path / "textured.glb")


def sphere_renderer(size: int, calls: list):
    """An analytic renderer: a ball of radius 0.4, red on its +Y half and white on its -Y half,
    Lambert-lit from the camera, on a gray background."""

    def render(cameras):
        calls.append(len(cameras))
        origins, dirs = camera_rays(cameras, size, size)
        b = (origins * dirs).sum(-1)
        disc = b * b - (origins * origins).sum(-1) + 0.4**2
        hit = disc > 0
        t = -b - disc.clamp_min(0).sqrt()
        normal = (origins + t[..., None] * dirs) / 0.4
        albedo = torch.where(normal[..., 1:2] > 0, torch.tensor([0.9, 0.1, 0.1]), torch.tensor([1.0, 1.0, 1.0]))
        shade = albedo * (-(normal * dirs).sum(-1, keepdim=True)).clamp_min(0)
        image = torch.where(hit[..., None], shade, torch.full_like(shade, 0.5))
        return image.permute(0, 3, 1, 2)

    return render


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_turntable(tmp_path, suffix):
    calls = []
    path = save_turntable(sphere_renderer(40, calls), tmp_path / f"turn{suffix}", frames=10, size=40, fps=5)
    assert calls == [8, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"turn{suffix}"]
    if suffix == ".gif":
        frames = iio.imread(path, index=None)[..., :3]
    else:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            frames = np.stack([f for f in reader])
    side = 40 if suffix == ".gif" else 48  # MP4 frames are padded to whole 16-pixel macro blocks
    assert frames.shape == (10, side, side, 3)
    first = frames[0].astype(float)
    assert first.std() > 20  # not blank
    centre = first[side // 2 - 3:side // 2 + 3, side // 2 - 3:side // 2 + 3].mean(axis=(0, 1))
    corner = first[:4, :4].mean(axis=(0, 1))
    assert np.abs(corner - 128).max() < 8 and np.abs(centre - corner).max() > 40
    assert np.abs(frames[0].astype(float) - frames[3].astype(float)).mean() > 5  # the object turns


def test_turntable_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4, \.gif"):
        save_turntable(sphere_renderer(32, []), tmp_path / "turn.avi", frames=2, size=32)
    with pytest.raises(ValueError, match="render_fn must return"):
        save_turntable(sphere_renderer(32, []), tmp_path / "turn.gif", frames=2, size=48)
    assert list(tmp_path.iterdir()) == []


def test_export_notes_are_the_exports_own_warnings(mesh, tmp_path, monkeypatch):
    """The notes shown to the user are ExportWarnings (a faint scene), not other libraries' warnings."""
    import types
    import warnings

    import dreamfusion.export
    from dreamfusion import runs
    from dreamfusion.config import ExportOptions
    from dreamfusion.export import ExportWarning, auto_threshold

    with pytest.warns(ExportWarning, match="faint"):
        assert auto_threshold(np.full((4, 4, 4), 1.0, dtype=np.float32)) == 0.5

    def noisy_extract(*args, **kwargs):
        warnings.warn("The given NumPy array is not writable", UserWarning, stacklevel=2)
        warnings.warn("density peaks low: a faint object", ExportWarning, stacklevel=2)
        return mesh

    monkeypatch.setattr(dreamfusion.export, "extract_mesh", noisy_extract)  # runs imports it when it exports
    field = types.SimpleNamespace(density_grid=torch.zeros(1), cfg=types.SimpleNamespace(bound=1.0), resolution=32,
                                  density=ellipsoid_density, albedo=red_blue_albedo)
    notes = runs.export_renderer(types.SimpleNamespace(field=field), tmp_path,
                                 ExportOptions(formats=("ply",), video="none", threshold=5.0, field_smoothing=0.0))
    assert notes == ["density peaks low: a faint object"]
    assert (tmp_path / "mesh.ply").exists()


# ----------------------------------------------------------------------------- asset steps

SPHERE_R = 0.4


def shell_density(p: torch.Tensor) -> torch.Tensor:
    """A smooth density that falls through the level 20 at radius 0.4: 20 exp(-10 (|p| - 0.4))."""
    return 20.0 * torch.exp(-10.0 * (p.norm(dim=-1) - SPHERE_R))


def test_density_gradient_by_hand():
    # density 3x + 2y^2: value and gradient (3, 4y, 0); central differences are exact for a quadratic
    fn = lambda p: 3 * p[:, 0] + 2 * p[:, 1] ** 2
    value, grad = density_gradient(fn, np.array([[0.5, 0.25, 0.0], [0.0, -0.5, 1.0]]), eps=0.01)
    assert np.allclose(value, [1.625, 0.5], atol=1e-6) and np.allclose(grad, [[3, 1, 0], [3, -2, 0]], atol=1e-4)


def test_refine_moves_a_noisy_sphere_onto_the_level_set():
    ball = trimesh.creation.icosphere(subdivisions=4, radius=SPHERE_R)
    rng = np.random.default_rng(0)
    noisy = ball.vertices * (1.0 + rng.uniform(-0.025, 0.025, (len(ball.vertices), 1)))  # up to 0.01 off the radius
    assert np.abs(np.linalg.norm(noisy, axis=1) - SPHERE_R).max() > 0.009
    refined = refine_vertices(noisy, shell_density, level=20.0, max_move=0.015)
    radius = np.linalg.norm(refined, axis=1)
    assert np.abs(radius - SPHERE_R).max() < 1e-5  # three Newton steps, from 0.01 off to 1e-5
    # along the gradient, which here is radial: each vertex keeps its direction
    assert np.allclose(refined / radius[:, None], noisy / np.linalg.norm(noisy, axis=1, keepdims=True), atol=1e-6)


def test_refine_moves_at_most_its_limit_and_not_where_the_field_is_flat():
    far = np.array([[0.5, 0.0, 0.0], [0.0, 0.0, -0.3]])  # 0.1 outside, 0.1 inside the level set
    refined = refine_vertices(far, shell_density, level=20.0, max_move=0.015)
    assert np.allclose(np.linalg.norm(refined, axis=1), [0.485, 0.315], atol=1e-9)
    flat = refine_vertices(far, lambda p: torch.full((len(p),), 7.0), level=20.0, max_move=0.015)
    assert np.array_equal(flat, far)
    assert np.array_equal(refine_vertices(far, shell_density, 20.0, 0.015, steps=0), far)
    with pytest.raises(ValueError):
        refine_vertices(far, shell_density, 20.0, max_move=0.0)


def test_extract_with_refinement_puts_vertices_on_the_surface():
    plain = extract_mesh(shell_density, red_blue_albedo, resolution=RES, bound=BOUND, threshold=20.0)
    refined = extract_mesh(shell_density, red_blue_albedo, resolution=RES, bound=BOUND, threshold=20.0, refine_steps=3)
    off = lambda m: np.abs(np.linalg.norm(m.vertices, axis=1) - SPHERE_R)
    assert off(plain).max() > 1e-3  # linear interpolation along grid edges of a curved field
    assert off(refined).max() < 1e-5
    assert len(refined.faces) == len(plain.faces) and refined.is_watertight


def test_distance_to_mesh_by_hand():
    ball = trimesh.creation.icosphere(subdivisions=4, radius=SPHERE_R)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(500, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # 0.05 outside the sphere; the flat faces lie up to 3e-4 inside it
    assert np.allclose(distance_to_mesh(0.45 * directions, ball), 0.05, atol=5e-4)
    assert np.allclose(distance_to_mesh(ball.vertices, ball), 0.0, atol=1e-12)
    # a box's face: a point 0.2 above the middle of the top face is 0.2 from it
    box = trimesh.creation.box(extents=(1, 1, 1))
    assert distance_to_mesh(np.array([[0.1, -0.2, 0.7]]), box) == pytest.approx([0.2])


def test_decimation_keeps_a_sphere_within_the_budget_and_reports_the_cost():
    ball = trimesh.creation.icosphere(subdivisions=5, radius=SPHERE_R)  # 20,480 faces
    light, cost = decimate_mesh(ball, 2000)
    assert len(light.faces) <= 2000 and light.is_watertight
    points, _ = trimesh.sample.sample_surface(light, 5000, seed=0)
    assert np.abs(np.linalg.norm(points, axis=1) - SPHERE_R).max() < 0.01  # the stated distance: within 0.01 of the sphere
    assert cost["faces_before"] == 20480 and cost["faces"] == len(light.faces)
    assert 0 < cost["mean_distance"] < 0.003 and cost["mean_distance"] <= cost["max_distance"] < 0.01
    # within the budget already: the same mesh, at no cost
    same, cost = decimate_mesh(ball, 30000)
    assert same is ball and cost["mean_distance"] == 0.0
    with pytest.raises(ValueError, match="face budget"):
        decimate_mesh(ball, 3)


def test_extract_with_a_face_budget_has_colours_and_its_cost():
    mesh = extract_mesh(ellipsoid_density, red_blue_albedo, resolution=RES, bound=BOUND, max_faces=1000)
    assert len(mesh.faces) <= 1000 and mesh.metadata["decimation"]["faces_before"] > 1000
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    front = mesh.vertices[:, 0] > 0.05
    assert (mesh.visual.vertex_colors[front, :3] == RED8).all()  # colours sampled on the decimated mesh



def test_extract_with_a_face_budget_drops_the_scraps_decimation_pinches_off(monkeypatch):
    import dreamfusion.export as export

    real = export.decimate_mesh

    def with_scrap(mesh, max_faces):  # as fast-simplification does on real scenes: two faces back to back, apart
        light, cost = real(mesh, max_faces - 2)
        corner = light.vertices.max(axis=0) + 0.01
        scrap = np.array([corner, corner + [0.001, 0, 0], corner + [0, 0.001, 0]])
        n = len(light.vertices)
        out = trimesh.Trimesh(np.concatenate([light.vertices, scrap]), np.concatenate([light.faces, [[n, n + 1, n + 2], [n, n + 2, n + 1]]]),
                              process=False)
        assert len(out.split(only_watertight=False)) == 2
        return out, {**cost, "faces": len(out.faces)}

    monkeypatch.setattr(export, "decimate_mesh", with_scrap)
    mesh = extract_mesh(ellipsoid_density, red_blue_albedo, resolution=RES, bound=BOUND, max_faces=1000)
    assert len(mesh.split(only_watertight=False)) == 1 and mesh.is_watertight
    assert mesh.metadata["decimation"]["faces"] == len(mesh.faces) <= 998
    assert len(mesh.visual.vertex_colors) == len(mesh.vertices)


def _two_colour_plane(noise: float, seed: int = 0):
    """A 40 x 40 grid of vertices in the plane z = 0, red where x < 0.5 and blue from there on,
    each channel off by a normal noise of standard deviation ``noise``."""
    n = 40
    x, y = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n), indexing="ij")
    vertices = np.stack([x.ravel(), y.ravel(), np.zeros(n * n)], axis=1)
    idx = np.arange(n * n).reshape(n, n)
    quads = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], axis=-1).reshape(-1, 4)
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    red = vertices[:, 0] < 0.5
    flat = np.where(red[:, None], RED, BLUE)
    colours = flat + np.random.default_rng(seed).normal(0.0, noise, flat.shape)
    return trimesh.Trimesh(vertices, faces, process=False), colours, flat, red


def test_colour_smoothing_evens_speckle_and_keeps_the_boundary():
    plane, colours, flat, red = _two_colour_plane(noise=0.03)
    smooth = smooth_colours(colours, plane.edges_unique, iterations=5, max_difference=0.15)
    before, after = np.std(colours - flat), np.std(smooth - flat)
    assert before == pytest.approx(0.03, rel=0.05) and after < before / 3
    # the boundary (the columns either side of x = 0.5): each vertex keeps its own side's colour
    assert np.abs(smooth - flat).max() < 0.06
    # without the edge test the two colours bleed into each other there
    blurred = smooth_colours(colours, plane.edges_unique, iterations=5, max_difference=1.0)
    assert np.abs(blurred - flat).max() > 0.2
    # by hand: a path 0 - 1 - 2 with colours 0, 0.1, 1 and threshold 0.5: one step averages 0 and 0.1 only
    one = smooth_colours(np.array([[0.0], [0.1], [1.0]]), np.array([[0, 1], [1, 2]]), iterations=1, max_difference=0.5)
    assert np.allclose(one, [[0.05], [0.05], [1.0]])
    assert np.array_equal(smooth_colours(colours, plane.edges_unique, 0, 0.15), colours)


def test_extract_with_colour_smoothing():
    rng = np.random.default_rng(0)
    noisy = lambda p: (red_blue_albedo(p) + torch.from_numpy(rng.normal(0, 0.03, (len(p), 3))).float()).clamp(0, 1)
    plain = extract_mesh(ellipsoid_density, noisy, resolution=RES, bound=BOUND)
    smooth = extract_mesh(ellipsoid_density, noisy, resolution=RES, bound=BOUND, colour_smoothing=5, colour_edge=0.15)
    front = plain.vertices[:, 0] > 0.05
    spread = lambda m: m.visual.vertex_colors[front, :3].astype(float).std(axis=0).mean()
    assert spread(smooth) < spread(plain) / 2


def _rippled_cube(half: float = 0.35, ripple: float = 0.004, res: int = 96) -> trimesh.Trimesh:
    """Marching cubes of a cube's distance field with a ripple of about a 64^3 grid's voxel added:
    dimpled faces, as a trained field's."""
    from skimage.measure import marching_cubes

    xs = np.linspace(-1.0, 1.0, res)
    x, y, z = np.meshgrid(xs, xs, xs, indexing="ij")
    sdf = np.maximum(np.maximum(np.abs(x), np.abs(y)), np.abs(z)) - half
    sdf += ripple * np.sin(100 * x) * np.sin(90 * y + 1) * np.sin(110 * z + 2)
    verts, faces, _, _ = marching_cubes(-sdf, 0.0, gradient_direction="ascent")
    return trimesh.Trimesh(verts * (2.0 / (res - 1)) - 1.0, faces, process=False)


def _cube_errors(mesh: trimesh.Trimesh, half: float = 0.35) -> tuple[float, float, float]:
    """Median and 90th-percentile angle (degrees) between the faces' normals and the true cube's
    normal there (the axis of the largest coordinate), and the area-weighted mean distance of the
    face centres to the true face's plane."""
    centre = mesh.triangles_center
    axis = np.argmax(np.abs(centre), axis=1)
    rows = np.arange(len(centre))
    true = np.zeros_like(centre)
    true[rows, axis] = np.sign(centre[rows, axis])
    angle = np.degrees(np.arccos(np.clip((mesh.face_normals * true).sum(axis=1), -1.0, 1.0)))
    distance = np.abs(np.abs(centre[rows, axis]) - half)
    return float(np.median(angle)), float(np.percentile(angle, 90)), float(np.average(distance, weights=mesh.area_faces))


def test_surface_smoothing_flattens_a_rippled_cube_in_place():
    mesh = _rippled_cube()
    median, p90, distance = _cube_errors(mesh)
    assert median > 4.0 and p90 > 10.0  # the ripple is there to remove
    smooth = mesh.copy()
    smooth.vertices = smooth_surface(mesh, iterations=10)
    median2, _, distance2 = _cube_errors(smooth)
    assert median2 < median / 2  # the faces flatter
    assert distance2 < distance  # onto the true planes, not away from them
    assert abs(smooth.volume - mesh.volume) < 0.02 * mesh.volume  # Taubin's steps do not shrink it as a Laplacian would
    assert np.array_equal(smooth.faces, mesh.faces)
    assert smooth.is_watertight and smooth.volume > 0
    # no face turned over: every face within 90 degrees of where it faced before
    assert (smooth.face_normals * mesh.face_normals).sum(axis=1).min() > 0
    assert np.array_equal(smooth_surface(mesh, 0), mesh.vertices)
    with pytest.raises(ValueError):
        smooth_surface(mesh, -1)


def test_extract_with_surface_smoothing_keeps_the_ellipsoid():
    plain = extract_mesh(ellipsoid_density, red_blue_albedo, resolution=RES, bound=BOUND)
    smooth = extract_mesh(ellipsoid_density, red_blue_albedo, resolution=RES, bound=BOUND, surface_smoothing=10)
    assert smooth.is_watertight and np.allclose(smooth.extents, plain.extents, atol=VOXEL / 2)
    # the staircase of a binary density's marching cubes evens out: the faces turn towards the true normals
    def error(m):
        true = m.triangles_center / np.square(RADII)
        true /= np.linalg.norm(true, axis=1, keepdims=True)
        return np.degrees(np.arccos(np.clip((m.face_normals * true).sum(axis=1), -1, 1))).mean()
    assert error(smooth) < 0.8 * error(plain)


def test_gaussian_blur_3d_by_hand():
    """A unit impulse spreads as the product of three normalised 1-D Gaussians (sigma 1: weights
    e^(-d^2/2) over d = -3..3); a constant and a linear ramp (away from the edges) stay as they are."""
    from dreamfusion.field import gaussian_blur_3d

    z = 1 + 2 * (np.exp(-0.5) + np.exp(-2.0) + np.exp(-4.5))
    impulse = torch.zeros(1, 1, 11, 11, 11, dtype=torch.float64)
    impulse[0, 0, 5, 5, 5] = 1.0
    out = gaussian_blur_3d(impulse, 1.0)[0, 0]
    assert out[5, 5, 5].item() == pytest.approx(z ** -3, rel=1e-9)
    assert out[5, 5, 6].item() == pytest.approx(np.exp(-0.5) * z ** -3, rel=1e-9)
    assert out[3, 5, 7].item() == pytest.approx(np.exp(-4.0) * z ** -3, rel=1e-9)
    assert out.sum().item() == pytest.approx(1.0, rel=1e-9)
    channels = torch.tensor([1.0, -2.0], dtype=torch.float64).view(1, 2, 1, 1, 1)
    ramp = torch.arange(11, dtype=torch.float64).view(1, 1, 1, 1, 11).expand(1, 2, 11, 11, 11) * channels
    blurred = gaussian_blur_3d(ramp, 1.0)
    assert torch.allclose(blurred[..., 3:8], ramp[..., 3:8], atol=1e-9)  # channels blurred apart
    assert torch.allclose(gaussian_blur_3d(torch.full((1, 1, 5, 5, 5), 2.5), 0.5), torch.full((1, 1, 5, 5, 5), 2.5))


def terraced_slab_field():
    """A grid field whose density is a slab under a tilted plane, with a transition much thinner
    than a voxel: its level set steps from one grid layer to the next (the trained fields' "wood
    grain"). Returns the field and the plane's unit normal and offset."""
    from dreamfusion.config import FieldConfig
    from dreamfusion.field import GridField

    field = GridField(FieldConfig(resolution=32, bound=1.0, blob_density=0.0, density_activation="exp"))
    axis = torch.linspace(-1.0, 1.0, 32)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    normal = torch.tensor([-0.25, 0.1, 1.0])
    normal = normal / normal.norm()
    above = x * normal[0] + y * normal[1] + z * normal[2] - 0.1
    outside = torch.maximum(torch.maximum(x.abs(), y.abs()) - 0.6, torch.maximum(above, -0.5 - z))
    with torch.no_grad():
        field.density_grid.copy_((-outside / field.voxel_size * 20).clamp(-10, 10)[None, None])
    return field, normal.numpy(), 0.1


def test_field_smoothing_evens_out_the_steps_between_grid_layers():
    """--export.field-smoothing blurs the raw density before the surface is found: on a tilted face
    whose level set steps between grid layers, the face's normals come closer to the true one and
    its points no farther from the true plane, with every other asset step at its default; the
    scene itself is left as it was."""
    import types

    from dreamfusion import runs
    from dreamfusion.config import ExportOptions

    field, normal, offset = terraced_slab_field()
    before = field.density_grid.detach().clone()
    scene = types.SimpleNamespace(field=field)

    def top_face(sigma):
        mesh, _ = runs.scene_mesh(scene, ExportOptions(formats=("ply",), video="none", threshold=1.0, faces=0, field_smoothing=sigma))
        centres = mesh.triangles_center
        top = (np.abs(centres[:, 0]) < 0.4) & (np.abs(centres[:, 1]) < 0.4) & (centres[:, 2] > -0.3)
        angle = np.degrees(np.arccos(np.clip(mesh.face_normals[top] @ normal, -1, 1)))
        return angle.mean(), np.abs(centres[top] @ normal - offset).mean()

    angle, distance = top_face(0.0)
    smooth_angle, smooth_distance = top_face(0.5)
    assert angle > 3.0  # the steps are there to be evened out
    assert smooth_angle < 0.85 * angle and smooth_distance <= distance
    assert torch.equal(field.density_grid, before)


def test_asset_options_can_be_turned_off_and_are_checked():
    """On by default at the values measured on the public list (docs/assets.md); 0 turns each off."""
    from dreamfusion.config import ExportOptions, validate_export

    opts = ExportOptions()
    assert (opts.refine_steps, opts.field_smoothing, opts.surface_smoothing, opts.faces, opts.colour_smoothing) == (3, 0.5, 30, 20000, 64)
    validate_export(ExportOptions(refine_steps=0, field_smoothing=0.0, surface_smoothing=0, faces=0, colour_smoothing=0))
    validate_export(ExportOptions(refine_steps=3, faces=20000, colour_smoothing=5, colour_edge=0.1))
    for bad in (dict(refine_steps=-1), dict(field_smoothing=-0.5), dict(field_smoothing=float("nan")),
                dict(surface_smoothing=-1), dict(surface_smoothing=1000),
                dict(faces=50), dict(faces=-5), dict(colour_smoothing=1000), dict(colour_edge=2.0)):
        with pytest.raises(ValueError):
            validate_export(ExportOptions(**bad))


def test_export_reports_what_decimation_cost(tmp_path):
    import types

    from dreamfusion import runs
    from dreamfusion.config import ExportOptions

    field = types.SimpleNamespace(density_grid=torch.zeros(1), cfg=types.SimpleNamespace(bound=1.0), resolution=32,
                                  density=ellipsoid_density, albedo=red_blue_albedo)
    notes = runs.export_renderer(types.SimpleNamespace(field=field), tmp_path,
                                 ExportOptions(formats=("ply",), video="none", threshold=5.0, field_smoothing=0.0, mesh_resolution=48, faces=500))
    assert len(notes) == 1 and notes[0].startswith("decimated to ") and "on average" in notes[0]
    assert len(trimesh.load(tmp_path / "mesh.ply", process=False).faces) <= 500
    # a mesh already within the budget is not decimated, and no note says it was
    within = runs.export_renderer(types.SimpleNamespace(field=field), tmp_path / "within",
                                  ExportOptions(formats=("ply",), video="none", threshold=5.0, field_smoothing=0.0, mesh_resolution=48, faces=100000))
    assert within == []


# ----------------------------------------------------------------------------- the textured GLB

GLTF_COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
GLTF_SIZES = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def read_glb(path):
    """A GLB file checked against the glTF 2.0 container rules (header, two 4-byte-aligned chunks,
    JSON then BIN, every buffer view inside the buffer, every accessor inside its view): (its JSON,
    a function from an accessor's index to its array, a function from an image's index to its bytes)."""
    data = path.read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_length, json_type = struct.unpack("<I4s", data[12:20])
    assert json_type == b"JSON" and json_length % 4 == 0
    tree = json.loads(data[20:20 + json_length])
    bin_start = 20 + json_length
    bin_length, bin_type = struct.unpack("<I4s", data[bin_start:bin_start + 8])
    assert bin_type == b"BIN\0" and bin_length % 4 == 0 and bin_start + 8 + bin_length == len(data)
    blob = data[bin_start + 8:bin_start + 8 + bin_length]
    assert tree["asset"]["version"] == "2.0" and len(tree["buffers"]) == 1 and tree["buffers"][0]["byteLength"] <= bin_length
    for view in tree["bufferViews"]:
        assert view.get("byteOffset", 0) + view["byteLength"] <= tree["buffers"][0]["byteLength"]

    def accessor(index):
        acc = tree["accessors"][index]
        view = tree["bufferViews"][acc["bufferView"]]
        dtype = np.dtype(GLTF_COMPONENTS[acc["componentType"]])
        width = GLTF_SIZES[acc["type"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        assert "byteStride" not in view or view["byteStride"] == dtype.itemsize * width
        assert start + acc["count"] * width * dtype.itemsize <= view.get("byteOffset", 0) + view["byteLength"]
        values = np.frombuffer(blob, dtype, acc["count"] * width, start).reshape(acc["count"], width)
        if "min" in acc:  # the spec requires POSITION's; where given they must be the true bounds
            assert np.allclose(values.min(axis=0), acc["min"]) and np.allclose(values.max(axis=0), acc["max"])
        return values

    def image(index):
        view = tree["bufferViews"][tree["images"][index]["bufferView"]]
        return blob[view.get("byteOffset", 0):view.get("byteOffset", 0) + view["byteLength"]]

    return tree, accessor, image


def test_textured_glb_is_valid_unlit_and_reproduces_the_albedo(mesh, tmp_path):
    import io

    from PIL import Image

    path = save_textured_glb(mesh, tmp_path / "textured.glb", texture_size=256)
    tree, accessor, image = read_glb(path)
    material = tree["materials"][0]
    assert material["extensions"] == {"KHR_materials_unlit": {}} and "KHR_materials_unlit" in tree["extensionsUsed"]
    assert "extensionsRequired" not in tree  # a viewer without the extension shows the matte PBR fallback
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0.0 and material["pbrMetallicRoughness"]["roughnessFactor"] == 1.0
    primitive = tree["meshes"][0]["primitives"][0]
    assert tree["textures"][material["pbrMetallicRoughness"]["baseColorTexture"]["index"]]["source"] == 0
    assert tree["images"][0]["mimeType"] == "image/png" and image(0)[:8] == b"\x89PNG\r\n\x1a\n"
    texture = np.asarray(Image.open(io.BytesIO(image(0))).convert("RGB"))
    assert texture.shape == (256, 256, 3)

    positions, uvs = accessor(primitive["attributes"]["POSITION"]), accessor(primitive["attributes"]["TEXCOORD_0"])
    indices = accessor(primitive["indices"]).ravel()
    assert len(positions) == len(uvs) and indices.max() < len(positions) and len(indices) % 3 == 0
    assert (uvs >= 0).all() and (uvs <= 1).all()
    # glTF is +Y up, the front still +X; its UVs address the image from its top-left corner: the
    # texel under each vertex is the albedo there (red in front, blue behind)
    assert np.allclose(positions.max(axis=0) - positions.min(axis=0), [0.8, 1.2, 0.8], atol=VOXEL)
    texel = texture[np.clip((uvs[:, 1] * 256).astype(int), 0, 255), np.clip((uvs[:, 0] * 256).astype(int), 0, 255)].astype(float)
    front, behind = positions[:, 0] > 0.1, positions[:, 0] < -0.1
    assert np.abs(texel[front] - RED8).mean() < 8 and np.abs(texel[behind] - BLUE8).mean() < 8

    # and trimesh reads it back with its texture
    back = trimesh.load(path, force="mesh")
    assert isinstance(back.visual, trimesh.visual.TextureVisuals) and back.visual.material.baseColorTexture.size == (256, 256)
    with pytest.raises(ValueError):
        save_textured_glb(mesh, tmp_path / "textured.obj")


def test_export_writes_the_textured_glb_only_when_asked(tmp_path):
    import types

    from dreamfusion import runs
    from dreamfusion.config import ExportOptions, validate_export

    assert ExportOptions().texture is False
    field = types.SimpleNamespace(density_grid=torch.zeros(1), cfg=types.SimpleNamespace(bound=1.0), resolution=32,
                                  density=ellipsoid_density, albedo=red_blue_albedo)
    scene = types.SimpleNamespace(field=field)
    runs.export_renderer(scene, tmp_path / "plain",
                         ExportOptions(formats=("glb",), video="none", threshold=5.0, field_smoothing=0.0, mesh_resolution=32))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["mesh.glb"]
    opts = ExportOptions(formats=("glb",), video="none", threshold=5.0, field_smoothing=0.0, mesh_resolution=32, texture=True, texture_size=128)
    validate_export(opts)
    runs.export_renderer(scene, tmp_path / "textured", opts)
    assert sorted(p.name for p in (tmp_path / "textured").iterdir()) == ["mesh.glb", runs.TEXTURED_GLB]
    with pytest.raises(ValueError, match="texture_size"):
        validate_export(ExportOptions(texture_size=4))


def test_axes_void_filling_leaves_a_torus_hole_open_at_every_resolution():
    # the hole's concave corners (above and below the ring's bulge) are enclosed from 5 axis
    # directions; the rule's opening, sized in world units, drops them at any marching-cubes grid
    big, tube = 0.3, 0.12

    def torus(p):
        ring = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - big
        return 20.0 * torch.sigmoid(-(torch.sqrt(ring ** 2 + p[:, 2] ** 2) - tube) / 0.01)

    def cup(p):  # open at the top: its inside, 0.36 across, is filled by the axes rule
        radius = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2)
        wall = (radius < 0.25) & (radius > 0.18) & (p[:, 2].abs() < 0.25)
        bottom = (radius < 0.25) & (p[:, 2] > -0.25) & (p[:, 2] < -0.18)
        return 20.0 * (wall | bottom).float()

    grey = lambda p: torch.full((len(p), 3), 0.5)  # noqa: E731
    true_volume = 2 * np.pi ** 2 * big * tube ** 2
    for resolution in (96, 160):
        mesh = extract_mesh(torus, grey, resolution=resolution, bound=0.75, threshold=10.0, fill_voids="axes")
        assert mesh.volume == pytest.approx(true_volume, rel=0.005)
    solid = extract_mesh(cup, grey, resolution=160, bound=0.75, threshold=10.0, fill_voids="axes")
    assert solid.volume == pytest.approx(np.pi * 0.25 ** 2 * 0.5, rel=0.05)
