"""Renders of a mesh (dreamfusion/mesh_render.py) and the match between a mesh's renders and the
field's (dreamfusion.metrics.render_match), on cases with known answers: a sphere's silhouette is
a disc, a tilted plane's colours and depths are those of the ray's hit point, two discs a known
distance apart overlap by a known area."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from dreamfusion.cameras import VIEW_DISTANCE, VIEW_FOCAL, Lights, camera_rays, make_cameras
from dreamfusion.mesh_render import project, render_mesh
from dreamfusion.metrics import render_match
from dreamfusion.shading import lambertian

RADIUS = 0.4


def coloured(mesh: trimesh.Trimesh, rgb) -> trimesh.Trimesh:
    rgba = np.concatenate([np.broadcast_to(np.asarray(rgb, dtype=np.float64), (len(mesh.vertices), 3)) * 255,
                           np.full((len(mesh.vertices), 1), 255.0)], axis=1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.round(rgba).astype(np.uint8))
    return mesh


def sphere(radius: float = RADIUS, centre=(0.0, 0.0, 0.0), rgb=(0.8, 0.2, 0.2)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    mesh.apply_translation(centre)
    return coloured(mesh, rgb)


def ray_sphere(cameras, size: int, radius: float = RADIUS, centre=(0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact silhouette (B, H, W) bool and distance to the surface along each pixel's ray."""
    origins, dirs = camera_rays(cameras, size, size)
    o = origins.double() - torch.tensor(centre, dtype=torch.float64)
    d = dirs.double()
    b = (o * d).sum(-1)
    disc = b * b - (o * o).sum(-1) + radius**2
    return disc > 0, -b - disc.clamp_min(0).sqrt()


def test_projection_inverts_the_renderers_rays():
    """A point on a pixel's ray (camera_rays) projects onto that pixel's centre, at its depth along the axis."""
    cams = make_cameras(torch.tensor([30.0, 200.0]), torch.tensor([20.0, -50.0]), VIEW_DISTANCE, VIEW_FOCAL)
    height, width = 24, 40
    origins, dirs = camera_rays(cams, height, width)
    rows, cols = np.array([0, 5, 23, 11]), np.array([0, 39, 17, 20])
    for v in range(len(cams)):
        points = (origins[v, rows, cols] + 1.7 * dirs[v, rows, cols]).double().numpy()
        image, depth = project(points, cams.c2w[v].double().numpy(), float(cams.focal[v]), height, width)
        np.testing.assert_allclose(image, np.stack([cols, rows], axis=1), atol=1e-4)
        forward = -cams.c2w[v, :, 2].double().numpy()
        np.testing.assert_allclose(depth, 1.7 * (dirs[v, rows, cols].double().numpy() @ forward), atol=1e-5)


def test_a_spheres_silhouette_and_depth_are_the_exact_spheres():
    cams = make_cameras(torch.tensor([30.0, 120.0, 250.0]), torch.tensor([20.0, 60.0, -30.0]), VIEW_DISTANCE, VIEW_FOCAL)
    size = 64
    out = render_mesh(sphere(), cams, size, size)
    assert out["image"].shape == (3, 3, size, size) and out["coverage"].shape == (3, 1, size, size)
    silhouette, distance = ray_sphere(cams, size)
    covered = out["coverage"][:, 0]
    assert covered.sum() > 0.2 * covered.numel()
    # the inscribed polygon differs from the disc only in a few pixels along its rim
    assert (covered ^ silhouette).sum() <= 0.01 * silhouette.sum()
    both = covered & silhouette
    assert (out["depth"][both].double() - distance[both]).abs().max() < 0.01  # the polygon's sag is under 0.001 of its 0.4 radius
    assert torch.allclose(out["image"][:, :, ~covered[0]][0], torch.ones(3, 1))  # a white background
    np.testing.assert_allclose(out["image"].permute(0, 2, 3, 1)[covered].numpy(), np.tile([204 / 255, 51 / 255, 51 / 255], (int(covered.sum()), 1)),
                               atol=1e-6)


def test_colours_and_depth_are_perspective_correct_on_a_tilted_plane():
    """A square tilted 40 degrees away from the camera, its vertex colours a linear function of
    position: every covered pixel shows that function at its ray's hit point (interpolating in image
    space instead would be off by several hundredths across the depth range)."""
    tilt = math.radians(40.0)
    corners = np.array([[0.0, -0.6, -0.6], [0.0, 0.6, -0.6], [0.0, 0.6, 0.6], [0.0, -0.6, 0.6]])
    rotation = trimesh.transformations.rotation_matrix(tilt, [0.0, 1.0, 0.0])[:3, :3]
    corners = corners @ rotation.T
    normal = rotation @ np.array([1.0, 0.0, 0.0])

    def colour_at(p: np.ndarray) -> np.ndarray:  # linear in position, in [0, 1] over the square
        return np.stack([0.5 + 0.7 * p[..., 1], 0.5 + 0.6 * p[..., 2], 0.3 + 0.2 * p[..., 0]], axis=-1)

    mesh = trimesh.Trimesh(corners, [[0, 1, 2], [0, 2, 3]], process=False)
    rgb = np.round(colour_at(corners) * 255) / 255
    coloured(mesh, rgb)
    cams = make_cameras(0.0, 0.0, VIEW_DISTANCE, VIEW_FOCAL)
    size = 48
    out = render_mesh(mesh, cams, size, size)
    origins, dirs = camera_rays(cams, size, size)
    o, d = origins[0].double().numpy(), dirs[0].double().numpy()
    t = -(o @ normal) / (d @ normal)  # the plane through the origin
    hits = o + t[..., None] * d
    covered = out["coverage"][0, 0].numpy()
    assert covered.sum() > 200
    # vertex colours are rounded to 1/255: a blend of them is within half of that of the function
    np.testing.assert_allclose(out["image"][0].permute(1, 2, 0).numpy()[covered], colour_at(hits[covered]), atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(out["depth"][0].numpy()[covered], t[covered], atol=1e-5)


def test_lit_mode_is_the_projects_shading():
    mesh = sphere(rgb=(0.6, 0.6, 0.2))
    cams = make_cameras(30.0, 20.0, VIEW_DISTANCE, VIEW_FOCAL)
    lights = Lights(torch.tensor([[0.0, 3.0, 2.0]]), torch.tensor([0.8]), torch.tensor([0.1]))
    size = 48
    out = render_mesh(mesh, cams, size, size, mode="lit", lights=lights, background=0.0)
    silhouette, distance = ray_sphere(cams, size)
    both = out["coverage"][0, 0] & silhouette[0]
    origins, dirs = camera_rays(cams, size, size)
    points = (origins[0] + distance[0, ..., None].float() * dirs[0])[both].double()
    albedo = torch.tensor([153, 153, 51], dtype=torch.float64) / 255  # the vertex colours, as uint8
    expected = lambertian(albedo, points / RADIUS, points, lights.position[0].double(), lights.intensity[0].double(), lights.ambient[0].double())
    assert (out["image"][0].permute(1, 2, 0)[both].double() - expected).abs().max() < 0.01  # smooth normals of a fine sphere
    assert out["image"][0].permute(1, 2, 0)[both].std(dim=0).max() > 0.05  # lit, not flat
    with pytest.raises(ValueError, match="needs lights"):
        render_mesh(mesh, cams, size, size, mode="lit")
    with pytest.raises(ValueError, match="albedo, lit or textureless"):
        render_mesh(mesh, cams, size, size, mode="normals")


def test_render_match_by_hand():
    coverage = np.array([[[True, True], [False, False]]])
    opacity = np.array([[[0.9, 0.2], [0.7, 0.1]]])  # covers (0, 0) and (1, 0)
    colour = np.zeros((1, 3, 2, 2))
    field = np.zeros((1, 3, 2, 2))
    field[0, :, 0, 0] = [0.3, 0.0, 0.6]  # the one pixel both cover: a difference of 0.3 on average
    field[0, :, 0, 1] = 1.0  # the mesh alone covers this one: not compared
    match = render_match(coverage, colour, opacity, field)
    assert match["render_silhouette_iou"] == pytest.approx(1 / 3)
    assert match["render_colour_diff"] == pytest.approx(0.3)
    none = render_match(np.zeros((1, 2, 2), bool), colour, opacity, field)
    assert none["render_silhouette_iou"] == 0.0 and none["render_colour_diff"] is None


def lens_iou(radius: float, distance: float) -> float:
    """IoU of two discs of the same radius whose centres are ``distance`` apart."""
    lens = 2 * radius**2 * math.acos(distance / (2 * radius)) - distance / 2 * math.sqrt(4 * radius**2 - distance**2)
    return lens / (2 * math.pi * radius**2 - lens)


def test_a_sphere_mesh_against_a_sphere_field_and_one_shifted_by_a_known_amount():
    """The mesh of the field's sphere matches the field's renders (IoU near 1, no colour difference);
    moved sideways by 0.1 it matches as two discs a tenth of a unit apart do (from a far, narrow
    camera, where silhouettes are discs of the sphere's radius in the image plane)."""
    distance, focal, size = 10.0, 5.0, 96  # 1 / focal * distance = 2 units across the image
    cams = make_cameras(torch.tensor([0.0, 90.0]), 0.0, distance, focal)
    silhouette, _ = ray_sphere(cams, size)
    opacity = silhouette.double() * 0.98  # the field's renders: opaque inside the disc
    field_colour = torch.tensor([0.8, 0.2, 0.2]).reshape(1, 3, 1, 1).expand(2, 3, size, size)

    out = render_mesh(sphere(rgb=(0.8, 0.2, 0.2)), cams, size, size)
    same = render_match(out["coverage"], out["image"], opacity, field_colour)
    assert same["render_silhouette_iou"] > 0.98
    assert same["render_colour_diff"] < 0.002  # uint8 rounding of the vertex colours

    shift = 0.1  # along +Y: sideways in the front view (azimuth 0), along the line of sight in the side view (azimuth 90)
    out = render_mesh(sphere(centre=(0.0, shift, 0.0), rgb=(0.5, 0.5, 0.5)), cams, size, size)
    pixels_per_unit = focal * size / distance
    front = render_match(out["coverage"][:1], out["image"][:1], opacity[:1], field_colour[:1])
    expected = lens_iou(RADIUS * pixels_per_unit, shift * pixels_per_unit)
    assert expected == pytest.approx(0.7260, abs=1e-4)  # by hand, r = 0.4, d = 0.1: lens 0.4229, union 0.5825
    assert front["render_silhouette_iou"] == pytest.approx(expected, abs=0.02)
    side = render_match(out["coverage"][1:], out["image"][1:], opacity[1:], field_colour[1:])
    assert side["render_silhouette_iou"] > 0.97  # nearer by 0.1 of 10: 1% larger
    assert front["render_colour_diff"] == pytest.approx(np.abs(128 / 255 - np.array([0.8, 0.2, 0.2])).mean(), abs=1e-6)
