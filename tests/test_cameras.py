"""Cameras, lights and view labels against shared/world/SPEC.md and hand-computed values."""

import math

import pytest
import torch

from dreamfusion.cameras import (
    CameraConfig,
    camera_rays,
    fov_degrees,
    make_cameras,
    orbit_cameras,
    sample_cameras,
    sample_lights,
    view_label,
)

# ----------------------------------------------------------------------------- view labels


@pytest.mark.parametrize(
    "phi, theta, label",
    [
        # overhead iff theta >= 60
        (0.0, 59.9, "front view"),
        (0.0, 60.0, "overhead view"),
        (180.0, 60.0, "overhead view"),
        (90.0, 90.0, "overhead view"),
        (90.0, 59.99, "side view"),
        # front: within 45 deg of 0 (inclusive)
        (0.0, 0.0, "front view"),
        (45.0, 0.0, "front view"),
        (45.1, 0.0, "side view"),
        (-10.0, 0.0, "front view"),
        (-45.0, 0.0, "front view"),
        (315.0, 0.0, "front view"),
        (315.1, 0.0, "front view"),
        (314.9, 0.0, "side view"),
        (360.0, 0.0, "front view"),
        (720.0 + 30.0, 0.0, "front view"),
        # back: within 45 deg of 180 (inclusive)
        (134.9, 0.0, "side view"),
        (135.0, 0.0, "back view"),
        (180.0, 0.0, "back view"),
        (225.0, 0.0, "back view"),
        (225.1, 0.0, "side view"),
        (-180.0, 0.0, "back view"),
        # side
        (90.0, 0.0, "side view"),
        (270.0, -10.0, "side view"),
        (-90.0, 30.0, "side view"),
    ],
)
def test_view_label_boundaries(phi, theta, label):
    assert view_label(phi, theta) == label


# ----------------------------------------------------------------------------- sampling


def test_sample_cameras_respects_and_covers_ranges():
    cfg = CameraConfig(zoom_range=None)  # focal drawn on its own; the zoom range is tested below
    g = torch.Generator().manual_seed(0)
    cams = sample_cameras(cfg, 5000, g)
    assert len(cams) == 5000
    assert cams.c2w.shape == (5000, 3, 4)
    for values, (lo, hi) in (
        (cams.azimuth, cfg.azimuth_range),
        (cams.elevation, cfg.elevation_range),
        (cams.distance, cfg.distance_range),
        (cams.focal, cfg.focal_range),
    ):
        assert values.shape == (5000,)
        assert torch.isfinite(values).all()
        assert values.min() >= lo and values.max() <= hi
        span = hi - lo
        # covers the range: extremes within 1% of the ends (for uniform draws the chance of
        # missing is (0.99)^5000, negligible)
        assert values.min() <= lo + 0.01 * span
        assert values.max() >= hi - 0.01 * span
        # and roughly uniform: mean near the middle
        assert abs(float(values.mean()) - (lo + hi) / 2) < 0.03 * span
    # the camera sits where its angles and distance say
    pos = cams.position
    assert torch.allclose(pos.norm(dim=-1), cams.distance, atol=1e-5)
    el = torch.rad2deg(torch.asin((pos[:, 2] / cams.distance).clamp(-1, 1)))
    assert torch.allclose(el, cams.elevation, atol=1e-2)
    low = cams.elevation < 80  # azimuth is ill-conditioned near the pole
    az = torch.rad2deg(torch.atan2(pos[low, 1], pos[low, 0])) % 360.0
    diff = (az - cams.azimuth[low] + 180.0) % 360.0 - 180.0
    assert diff.abs().max() < 1e-2
    # every camera looks at the origin
    assert torch.allclose(-cams.c2w[:, :, 2], -pos / pos.norm(dim=-1, keepdim=True), atol=1e-5)


def test_sample_cameras_wraps_azimuth():
    cfg = CameraConfig(azimuth_range=(-30.0, 30.0))
    cams = sample_cameras(cfg, 2000, torch.Generator().manual_seed(1))
    az = cams.azimuth
    assert ((az >= 0) & (az < 360)).all()
    assert ((az <= 30) | (az >= 330)).all()
    assert (az <= 30).any() and (az >= 330).any()


def test_sample_cameras_deterministic_under_seed():
    cfg = CameraConfig()
    a = sample_cameras(cfg, 64, torch.Generator().manual_seed(123))
    b = sample_cameras(cfg, 64, torch.Generator().manual_seed(123))
    c = sample_cameras(cfg, 64, torch.Generator().manual_seed(124))
    for name in ("c2w", "focal", "azimuth", "elevation", "distance"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.azimuth, c.azimuth)
    la = sample_lights(cfg, a, torch.Generator().manual_seed(5))
    lb = sample_lights(cfg, b, torch.Generator().manual_seed(5))
    assert torch.equal(la.position, lb.position)
    assert torch.equal(la.intensity, lb.intensity)
    assert torch.equal(la.ambient, lb.ambient)


# ----------------------------------------------------------------------------- frame


def _orthonormal(R: torch.Tensor, atol=1e-5) -> bool:
    eye = torch.eye(3).expand_as(R)
    return torch.allclose(R.transpose(-1, -2) @ R, eye, atol=atol)


def test_front_camera_frame():
    cams = make_cameras(0.0, 0.0, 2.0, 1.0)
    assert len(cams) == 1
    c2w = cams.c2w[0]
    assert torch.allclose(cams.position[0], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)
    right, up, back = c2w[:, 0], c2w[:, 1], c2w[:, 2]
    # looks at the origin along -back
    assert torch.allclose(-back, torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)
    # +Y is on the image's right, +Z is up
    assert torch.allclose(right, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(up, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    # right-handed: right x up = back
    assert torch.allclose(torch.cross(right, up, dim=0), back, atol=1e-6)
    assert _orthonormal(c2w[:, :3][None])
    assert torch.det(c2w[:, :3]) == pytest.approx(1.0, abs=1e-5)


def test_front_camera_plus_y_on_image_right_plus_z_on_top():
    cams = make_cameras(0.0, 0.0, 2.0, 1.0)
    _, dirs = camera_rays(cams, 16, 16)
    # rightmost column looks towards +Y, leftmost towards -Y
    assert (dirs[0, :, -1, 1] > 0).all()
    assert (dirs[0, :, 0, 1] < 0).all()
    # top row (row 0) looks up (+Z), bottom row down
    assert (dirs[0, 0, :, 2] > 0).all()
    assert (dirs[0, -1, :, 2] < 0).all()
    # project the world point (0, 0.3, 0.2) by hand: camera at (2,0,0), focal 1.0 * width
    # pixels -> u = W/2 + f * 0.3 / 2, v = H/2 - f * 0.2 / 2 (rows grow downwards)
    W = H = 16
    u = W / 2 + 1.0 * W * 0.3 / 2.0
    v = H / 2 - 1.0 * H * 0.2 / 2.0
    j, i = int(v), int(u)  # pixel containing the projection
    target = torch.tensor([0.0, 0.3, 0.2]) - torch.tensor([2.0, 0.0, 0.0])
    target = target / target.norm()
    # the pixel whose ray is closest to the target direction is the hand-computed one
    cos = (dirs[0] * target).sum(-1)
    best = int(cos.argmax())
    assert (best // W, best % W) == (j, i)


def test_back_and_side_cameras():
    cams = make_cameras(torch.tensor([90.0, 180.0]), 0.0, 2.0, 1.0)
    # phi = 90: camera on +Y; looking at -Y; image right is -X
    assert torch.allclose(cams.position[0], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)
    assert torch.allclose(cams.c2w[0, :, 0], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)
    # phi = 180: camera on -X; image right is -Y
    assert torch.allclose(cams.position[1], torch.tensor([-2.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(cams.c2w[1, :, 0], torch.tensor([0.0, -1.0, 0.0]), atol=1e-6)
    assert _orthonormal(cams.c2w[:, :, :3])


@pytest.mark.parametrize("phi", [0.0, 37.0, 180.0, 300.0])
def test_overhead_camera_is_well_defined(phi):
    cams = make_cameras(phi, 90.0, 1.8, 1.1)
    c2w = cams.c2w[0]
    assert torch.isfinite(c2w).all()
    R = c2w[:, :3]
    assert _orthonormal(R[None])
    assert torch.det(R) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(cams.position[0], torch.tensor([0.0, 0.0, 1.8]), atol=1e-5)
    assert torch.allclose(-R[:, 2], torch.tensor([0.0, 0.0, -1.0]), atol=1e-5)
    _, dirs = camera_rays(cams, 5, 5)
    assert torch.isfinite(dirs).all()
    assert torch.allclose(dirs[0, 2, 2], torch.tensor([0.0, 0.0, -1.0]), atol=1e-5)


def test_sampled_frames_orthonormal():
    cams = sample_cameras(CameraConfig(), 500, torch.Generator().manual_seed(3))
    R = cams.c2w[:, :, :3]
    assert torch.isfinite(R).all()
    assert _orthonormal(R, atol=1e-4)
    assert torch.allclose(torch.det(R), torch.ones(500), atol=1e-4)
    # the up vector never points down: the world's +Z is never upside down on the image
    assert (R[:, 2, 1] >= -1e-6).all()


# ----------------------------------------------------------------------------- rays


@pytest.mark.parametrize("h, w", [(8, 8), (7, 7), (6, 9), (9, 4)])
def test_camera_rays_shapes_norms_and_centre(h, w):
    cams = make_cameras(torch.tensor([0.0, 123.0]), torch.tensor([10.0, 45.0]), torch.tensor([2.0, 1.7]), torch.tensor([1.0, 1.2]))
    origins, dirs = camera_rays(cams, h, w)
    assert origins.shape == dirs.shape == (2, h, w, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(2, h, w), atol=1e-5)
    assert torch.allclose(origins, cams.position[:, None, None, :].expand_as(origins))
    # pixel offset of each ray from the image centre, in pixels, in the camera frame
    R = cams.c2w[:, :, :3]
    cam_dirs = torch.einsum("bji,bhwj->bhwi", R, dirs)  # R^T d
    f_pix = cams.focal[:, None, None] * w
    du = cam_dirs[..., 0] / -cam_dirs[..., 2] * f_pix
    dv = cam_dirs[..., 1] / -cam_dirs[..., 2] * f_pix
    # the centre of the image looks at the origin: the central pixel(s) are within half a pixel
    rows = [h // 2] if h % 2 else [h // 2 - 1, h // 2]
    cols = [w // 2] if w % 2 else [w // 2 - 1, w // 2]
    for r in rows:
        for c in cols:
            assert (du[:, r, c].abs() <= 0.5 + 1e-4).all()
            assert (dv[:, r, c].abs() <= 0.5 + 1e-4).all()
    # odd sizes: the central ray goes through the origin exactly
    to_origin = -cams.position / cams.position.norm(dim=-1, keepdim=True)
    if h % 2 and w % 2:
        assert torch.allclose(dirs[:, h // 2, w // 2], to_origin, atol=1e-5)
    else:
        mean = dirs[:, rows][:, :, cols].reshape(2, -1, 3).mean(1)
        mean = mean / mean.norm(dim=-1, keepdim=True)
        assert torch.allclose(mean, to_origin, atol=1e-5)
    # pixel spacing is one pixel in u along rows and in v along columns
    assert torch.allclose(du[:, :, 1:] - du[:, :, :-1], torch.ones_like(du[:, :, 1:]), atol=1e-3)
    assert torch.allclose(dv[:, :-1, :] - dv[:, 1:, :], torch.ones_like(dv[:, 1:, :]), atol=1e-3)


def test_fov_degrees():
    # focal = 0.5 * width -> half-angle atan(1) = 45 deg -> fov 90
    assert fov_degrees(0.5) == pytest.approx(90.0)
    assert fov_degrees(1.0) == pytest.approx(math.degrees(2 * math.atan(0.5)))
    cams = make_cameras(0.0, 0.0, 2.0, 1.0)
    _, dirs = camera_rays(cams, 1, 1001)
    # outermost pixel centres span almost the full fov
    cos = (dirs[0, 0, 0] * dirs[0, 0, -1]).sum()
    span = math.degrees(math.acos(float(cos)))
    assert span == pytest.approx(fov_degrees(1.0) * 1000 / 1001, rel=2e-3)


# ----------------------------------------------------------------------------- lights


def test_sample_lights_near_camera():
    cfg = CameraConfig()
    g = torch.Generator().manual_seed(7)
    cams = sample_cameras(cfg, 5000, g)
    lights = sample_lights(cfg, cams, g)
    assert lights.position.shape == (5000, 3)
    assert lights.intensity.shape == lights.ambient.shape == (5000,)
    offset = lights.position - cams.position
    d = offset.norm(dim=-1)
    # isotropic Gaussian jitter of std s: E|x|^2 = 3 s^2, E|x| = s * 2 sqrt(2/pi)
    s = cfg.light_jitter
    assert float(d.pow(2).mean().sqrt()) == pytest.approx(s * math.sqrt(3), rel=0.05)
    assert float(d.mean()) == pytest.approx(s * 2 * math.sqrt(2 / math.pi), rel=0.05)
    assert offset.mean(0).abs().max() < 0.05
    assert torch.allclose(offset.std(0), torch.full((3,), s), rtol=0.06)
    lo, hi = cfg.light_intensity_range
    assert lights.intensity.min() >= lo and lights.intensity.max() <= hi
    assert lights.intensity.min() < lo + 0.01 * (hi - lo) and lights.intensity.max() > hi - 0.01 * (hi - lo)
    lo, hi = cfg.ambient_range
    assert lights.ambient.min() >= lo and lights.ambient.max() <= hi
    assert lights.ambient.min() < lo + 0.01 * (hi - lo) and lights.ambient.max() > hi - 0.01 * (hi - lo)


def test_sample_lights_zero_jitter_is_at_camera():
    cfg = CameraConfig(light_jitter=0.0)
    cams = sample_cameras(cfg, 10, torch.Generator().manual_seed(0))
    lights = sample_lights(cfg, cams, torch.Generator().manual_seed(0))
    assert torch.allclose(lights.position, cams.position)


# ----------------------------------------------------------------------------- orbits


def test_orbit_cameras_start_at_front():
    cams = orbit_cameras(8)
    assert len(cams) == 8
    assert float(cams.azimuth[0]) == 0.0
    assert view_label(float(cams.azimuth[0]), float(cams.elevation[0])) == "front view"
    pos0 = cams.position[0]
    assert pos0[0] > 0 and abs(float(pos0[1])) < 1e-6 and pos0[2] > 0  # on +X, elevated 20 deg
    assert torch.allclose(cams.azimuth, torch.arange(8.0) * 45.0)
    assert torch.allclose(cams.distance, torch.full((8,), 1.9))
    assert torch.allclose(cams.position.norm(dim=-1), torch.full((8,), 1.9), atol=1e-5)
    assert torch.allclose(cams.position[:, 2], torch.full((8,), 1.9 * math.sin(math.radians(20.0))), atol=1e-5)
    labels = [view_label(float(a), float(e)) for a, e in zip(cams.azimuth, cams.elevation, strict=True)]
    assert labels == ["front view", "front view", "side view", "back view", "back view", "back view", "side view", "front view"]


# ----------------------------------------------------------------------------- render conditions


def test_render_condition_features_by_hand():
    from dreamfusion.cameras import RENDER_CONDITION_FEATURES, Lights, render_condition_features

    cams = make_cameras([0.0, 90.0], [0.0, 30.0], [1.9, 2.2], [1.35, 1.55])
    # light 1 at the first camera (straight along its 'back' axis); light 2 above the origin
    lights = Lights(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]]), torch.tensor([0.7, 0.9]), torch.tensor([0.15, 0.05]))
    f = render_condition_features(cams, lights, ["lit", "albedo"])
    assert f.shape == (2, RENDER_CONDITION_FEATURES)
    expected0 = [0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert torch.allclose(f[0], torch.tensor(expected0, dtype=torch.float32), atol=1e-6)
    # azimuth 90, elevation 30: sin/cos of 90 and 180 degrees; distance 2.2 -> +1, focal 1.55 -> +1
    s30, c30 = 0.5, math.sqrt(3) / 2
    assert torch.allclose(f[1, :8], torch.tensor([1.0, 0.0, 0.0, -1.0, 30 / 90, s30, 1.0, 1.0]), atol=1e-6)
    # +Z seen from a camera 30 degrees up: along 'up' by cos 30 and towards the camera by sin 30
    assert torch.allclose(f[1, 8:11], torch.tensor([0.0, c30, s30]), atol=1e-6)
    assert torch.allclose(f[1, 11:], torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, 1.0]), atol=1e-6)


def test_render_condition_features_dropped_and_bad_modes():
    from dreamfusion.cameras import default_light, render_condition_features

    cams = make_cameras([10.0, 200.0], [5.0, 70.0], 1.9, 1.35)
    f = render_condition_features(cams, default_light(cams), ["textureless", "lit"], present=torch.tensor([True, False]))
    assert f[0, -1] == 1 and f[0, 14] == 1 and torch.count_nonzero(f[1]) == 0
    with pytest.raises(ValueError, match="shading mode"):
        render_condition_features(cams, default_light(cams), ["lit", "normals"])
    with pytest.raises(ValueError, match="shading mode"):
        render_condition_features(cams, default_light(cams), ["lit"])


def test_light_and_ambient_never_exceed_one():
    """The prior's training renders are clamped to [0, 1]; the one distribution keeps lit renders there
    without clamping, so SDS never shows the prior a value it has not seen."""
    cfg = CameraConfig()
    assert cfg.light_intensity_range[1] + cfg.ambient_range[1] <= 1.0 + 1e-9
    cams = sample_cameras(cfg, 2000, torch.Generator().manual_seed(0))
    lights = sample_lights(cfg, cams, torch.Generator().manual_seed(1))
    assert float((lights.intensity + lights.ambient).max()) <= 1.0


def test_framing_keeps_every_object_inside_the_frame():
    """The tight framing of the camera distribution: at its closest and narrowest camera, every
    object of the world is inside the frame, and at the median camera it fills a good part of it."""
    from dreamfusion.prior.data import render_object
    from dreamfusion.prior.world import all_objects

    cfg = CameraConfig()
    az = torch.arange(8.0) * 45.0
    for el in (-30.0, 0.0, 20.0, 45.0):
        close = make_cameras(az, el, cfg.distance_range[0], cfg.zoom_range[1] * cfg.distance_range[0])
        for obj in all_objects():
            alpha = render_object(obj, close, default_light_for(close), ["albedo"] * 8, 32, with_alpha=True)[:, 3]
            border = torch.cat([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], dim=1)
            assert float(border.max()) < 0.5, (obj.noun, el)
    mid = make_cameras(az, 20.0, sum(cfg.distance_range) / 2, sum(cfg.zoom_range) / 2 * sum(cfg.distance_range) / 2)
    cube = next(o for o in all_objects() if o.noun == "cube")
    coverage = render_object(cube, mid, default_light_for(mid), ["albedo"] * 8, 32, with_alpha=True)[:, 3].mean()
    assert coverage > 0.3


def test_zoom_range_ties_focal_length_to_distance():
    cfg = CameraConfig()
    cams = sample_cameras(cfg, 3000, torch.Generator().manual_seed(2))
    ratio = cams.focal / cams.distance
    assert float(ratio.min()) >= cfg.zoom_range[0] - 1e-6 and float(ratio.max()) <= cfg.zoom_range[1] + 1e-6
    assert float(ratio.min()) < cfg.zoom_range[0] + 0.005 and float(ratio.max()) > cfg.zoom_range[1] - 0.005


def default_light_for(cams):
    from dreamfusion.cameras import default_light

    return default_light(cams)


def test_ray_condition_maps_by_hand():
    from dreamfusion.cameras import ray_condition_maps

    cams = make_cameras([0.0, 90.0], 0.0, 2.0, 1.0)
    maps = ray_condition_maps(cams, 4)
    assert maps.shape == (2, 6, 4, 4)
    # the four central pixels of a camera on +X look (nearly) along -X and pass (nearly) through the origin
    centre = maps[0, :, 1:3, 1:3].mean(dim=(1, 2))
    assert torch.allclose(centre[:3] / centre[:3].norm(), torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(centre[3:], torch.zeros(3), atol=1e-6)
    # unit directions; the moment is perpendicular to the direction; |o x d| = the ray's distance from the origin
    d, m = maps[:, :3], maps[:, 3:]
    assert torch.allclose(d.norm(dim=1), torch.ones(2, 4, 4), atol=1e-6)
    assert torch.allclose((d * m).sum(dim=1), torch.zeros(2, 4, 4), atol=1e-5)
    # pixel (row 0, col 3) of the +X camera: up and to the right (+Y on the right, +Z up), so its moment
    # o x d = (2, 0, 0) x (-1, y, z) = (0, -2 z, 2 y) has y > 0, z > 0
    assert float(maps[0, 4, 0, 3]) < 0 and float(maps[0, 5, 0, 3]) > 0
    # the camera on +Y sees the same rays turned by 90 degrees about Z
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    turned = torch.einsum("ij,jhw->ihw", rot, maps[0, :3])
    assert torch.allclose(turned, maps[1, :3], atol=1e-6)


def test_nearest_ray_maps_by_hand():
    """The "nearest" ray map holds each ray's point nearest the origin, p = o - (o . d) d: by hand
    for a camera on +X at distance 2 (its pixel rays start at (2, 0, 0)); p is perpendicular to d,
    gives the same line as the Plücker moment (p x d = o x d), at its distance from the origin."""
    from dreamfusion.cameras import camera_rays, ray_condition_maps

    cams = make_cameras([0.0, 90.0], 0.0, 2.0, 1.0)
    plucker, nearest = ray_condition_maps(cams, 4), ray_condition_maps(cams, 4, "nearest")
    assert torch.equal(plucker[:, :3], nearest[:, :3])  # the same unit directions
    d, p = nearest[:, :3], nearest[:, 3:]
    assert torch.allclose((d * p).sum(dim=1), torch.zeros(2, 4, 4), atol=1e-6)
    assert torch.allclose(torch.cross(p, d, dim=1), plucker[:, 3:], atol=1e-6)
    origins, dirs = camera_rays(cams, 4, 4)
    o, dd = origins[0, 0, 3], dirs[0, 0, 3]  # pixel (row 0, col 3) of the +X camera
    assert torch.allclose(o, torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)
    # o = (2, 0, 0), d = (dx, dy, dz): o . d = 2 dx, so p = (2 - 2 dx^2, -2 dx dy, -2 dx dz)
    by_hand = torch.stack([2 - 2 * dd[0] ** 2, -2 * dd[0] * dd[1], -2 * dd[0] * dd[2]])
    assert torch.allclose(p[0, :, 0, 3], by_hand, atol=1e-6)
    assert float(p[0, 1, 0, 3]) > 0 and float(p[0, 2, 0, 3]) > 0  # up and to the right: +Y, +Z
    # |p| is the ray's distance from the origin, |o x d|; the central pixels' points straddle the axis
    assert torch.allclose(p.norm(dim=1), plucker[:, 3:].norm(dim=1), atol=1e-6)
    assert torch.allclose(p[0, 1:, 1:3, 1:3].mean(dim=(1, 2)), torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError, match="unknown ray map"):
        ray_condition_maps(cams, 4, "depth")


def test_sample_backgrounds_fraction_and_colours():
    from dreamfusion.cameras import sample_backgrounds

    assert torch.equal(sample_backgrounds(5, 0.0, torch.Generator().manual_seed(0)), torch.ones(5, 3))
    all_random = sample_backgrounds(400, 1.0, torch.Generator().manual_seed(0))
    assert all_random.shape == (400, 3) and all_random.min() >= 0 and all_random.max() < 1
    assert 0.45 < float(all_random.mean()) < 0.55  # uniform in [0, 1]
    half = sample_backgrounds(2000, 0.5, torch.Generator().manual_seed(1))
    white = (half == 1).all(dim=1).float().mean()
    assert 0.46 < float(white) < 0.54
    again = sample_backgrounds(2000, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(half, again)
    with pytest.raises(ValueError, match="between 0 and 1"):
        sample_backgrounds(3, 1.5)
