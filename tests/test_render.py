"""The occupancy-grid renderer: ray geometry, volume-rendering weights, the PyTorch sampler against
dense sampling, shading modes and normals."""

import math

import torch
import torch.nn.functional as F

from dreamfusion.cameras import default_light, make_cameras
from dreamfusion.field import Background, FieldConfig, GridField, blob_bias, blob_bias_gradient, trilinear_corners, trilinear_volume_grad
from dreamfusion.render import (
    RenderConfig,
    Renderer,
    march,
    occupied_box,
    occupied_cells,
    packed_transmittance,
    packed_weights,
    ray_aabb,
    ray_box,
)


def test_ray_aabb_by_hand():
    o = torch.tensor([[2.0, 0, 0], [2.0, 5.0, 0], [0.0, 0, 0]])
    d = torch.tensor([[-1.0, 0, 0], [-1.0, 0, 0], [0.0, 0, 1.0]])
    near, far, hit = ray_aabb(o, d, 1.0)
    assert torch.allclose(near[0], torch.tensor(1.0)) and torch.allclose(far[0], torch.tensor(3.0))
    assert not hit[1]  # passes beside the box
    assert near[2] == 0 and torch.allclose(far[2], torch.tensor(1.0))  # starts inside


def test_march_places_samples_at_fixed_steps_and_masks_past_far():
    t0, t1, valid = march(torch.tensor([1.0]), torch.tensor([1.33]), 0.1, 6)
    assert torch.allclose(t0[0], torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4, 1.5]))
    assert torch.allclose(t1 - t0, torch.full_like(t0, 0.1))
    assert valid[0].tolist() == [True, True, True, False, False, False]  # midpoints 1.05, 1.15, 1.25 < 1.33


def test_ray_box_by_hand():
    o = torch.tensor([[2.0, 0.25, 0], [2.0, -0.5, 0]])
    d = torch.tensor([[-1.0, 0, 0], [-1.0, 0, 0]])
    near, far, hit = ray_box(o, d, torch.tensor([-0.5, 0.0, -1.0]), torch.tensor([0.5, 1.0, 1.0]))
    assert torch.allclose(near[0], torch.tensor(1.5)) and torch.allclose(far[0], torch.tensor(2.5)) and hit[0]
    assert not hit[1]  # below the box in y


def test_march_of_a_window_gives_the_full_march_samples():
    near, far = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.2])
    jitter = torch.tensor([[0.3], [0.7]])
    full = march(near, far, 0.1, 12, jitter)
    part = march(near, far, 0.1, 12, jitter, first=torch.tensor([3.0, 9.0]), count=5)
    assert torch.equal(part[0][0], full[0][0, 3:8]) and torch.equal(part[1][0], full[1][0, 3:8])
    assert torch.equal(part[0][1, :3], full[0][1, 9:12])  # bit for bit
    assert torch.equal(part[2][0], full[2][0, 3:8])
    assert part[2][1].tolist() == full[2][1, 9:12].tolist() + [False, False]  # steps past n_steps are not samples


def test_occupied_box_by_hand():
    binaries = torch.zeros(4, 4, 4, dtype=torch.bool)
    assert occupied_box(binaries, 1.0) is None
    binaries[3, 0, 1] = True
    binaries[1, 2, 1] = True
    lo, hi = occupied_box(binaries, 1.0)
    assert lo.tolist() == [-0.5, -1.0, -0.5] and hi.tolist() == [1.0, 0.5, 0.0]


def test_sampler_finds_exactly_the_samples_of_a_full_march():
    """The windowed march looks at fewer steps but finds the very samples (same positions, same
    order) that marching every step and looking each up in the occupancy grid finds."""
    field = _ball_field(radius=0.25)
    with torch.no_grad():
        field.density_grid[0, 0, 20:24, 4:7, 25:28] = 8.0  # a second, off-centre lump
    occ = Renderer(field, Background("white"), RenderConfig(sampler="torch", occupancy_warmup=1000))
    torch.manual_seed(0)
    for _ in range(30):
        occ.update_occupancy(0, force=True)
    cams = make_cameras([0.0, 120.0, 250.0], [10.0, 40.0, -5.0], 2.0, 1.0)
    from dreamfusion.cameras import camera_rays

    o, d = (v.reshape(-1, 3) for v in camera_rays(cams, 24, 24))
    for stratified in (False, True):
        ray_idx, t0, t1 = occ._sample_torch(o, d, stratified, torch.Generator().manual_seed(3), dense=False)
        near, far, hit = ray_aabb(o, d, 1.0)
        jitter = torch.rand(o.shape[0], 1, generator=torch.Generator().manual_seed(3)) if stratified else None
        ts, te, valid = march(near, far, occ.step_size, occ.cfg.samples_per_ray + 1, jitter)
        mids = o[:, None] + d[:, None] * ((ts + te) * 0.5)[..., None]
        valid &= hit[:, None] & occupied_cells(mids, occ.estimator.binaries[0], 1.0)
        r, k = valid.nonzero(as_tuple=True)
        assert r.numel() > 100
        assert torch.equal(ray_idx, r) and torch.equal(t0, ts[r, k]) and torch.equal(t1, te[r, k])
    occ.estimator.binaries.fill_(False)  # nothing occupied: no samples, only the background
    out = occ.render(cams, default_light(cams), 24, 24, "lit")
    assert out["n_samples"] == 0 and torch.allclose(out["image"], torch.ones_like(out["image"]))


def test_occupied_cells_indexes_x_y_z():
    binaries = torch.zeros(4, 4, 4, dtype=torch.bool)
    binaries[3, 0, 1] = True  # x in [0.5, 1], y in [-1, -0.5], z in [-0.5, 0]
    pts = torch.tensor([[0.7, -0.7, -0.2], [0.7, -0.7, 0.2], [-0.7, -0.7, -0.2], [1.5, -0.7, -0.2]])
    assert occupied_cells(pts, binaries, 1.0).tolist() == [True, False, False, False]


def test_blob_bias_and_its_gradient():
    p = torch.tensor([[0.3, 0.0, 0.4]])
    assert torch.allclose(blob_bias(p, 5.0, 0.2), torch.tensor([5.0 * (1 - 0.5 / 0.2)]))
    p.requires_grad_(True)
    blob_bias(p, 5.0, 0.2).sum().backward()
    assert torch.allclose(blob_bias_gradient(p.detach(), 5.0, 0.2), p.grad)


def _constant_field(raw: float, res: int = 8) -> GridField:
    field = GridField(FieldConfig(resolution=res, bound=1.0, blob_density=0.0, density_activation="softplus"))
    with torch.no_grad():
        field.density_grid[:, 0] = raw
    return field


def test_opacity_of_a_uniform_box_matches_beer_lambert():
    field = _constant_field(2.0)
    sigma = math.log1p(math.exp(2.0))  # softplus
    renderer = Renderer(field, Background("black"), RenderConfig(samples_per_ray=200, sampler="dense"))
    o, d = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[-1.0, 0.0, 0.0]])
    one = torch.ones(1)
    out = renderer.render_rays(o, d, o, one, one * 0.2, "albedo")
    length = 2.0  # through the box along x
    expected = 1 - math.exp(-sigma * length)
    step = renderer.step_size
    assert abs(float(out["opacity"]) - expected) < sigma * step * math.exp(-sigma * (length - step))
    # expected termination distance: the box starts 2 units from the origin, then ~1/sigma in
    assert 2.0 < float(out["depth"] / out["opacity"]) < 2.0 + 1 / sigma + step


def _ball_field(radius=0.3, res=32, peak=10.0, sharpness=100.0) -> GridField:
    field = GridField(FieldConfig(resolution=res, bound=1.0, blob_density=0.0, density_activation="softplus"))
    lin = torch.linspace(-1, 1, res)
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    r = torch.sqrt(x * x + y * y + z * z)
    with torch.no_grad():
        field.density_grid[0, 0] = (sharpness * (radius - r)).clamp(-30.0, peak)  # a smooth ball; softplus(-30) ~ 1e-13: truly empty
        field.albedo_grid[0, 0] = torch.where(x > 0, 2.0, -2.0)  # red at +X, dark elsewhere
        field.albedo_grid[0, 1:3] = -2.0
    return field


def test_occupancy_sampler_gives_the_dense_image_with_far_fewer_samples():
    field = _ball_field()
    cams = make_cameras([0.0, 120.0], [10.0, 40.0], 2.0, 1.0)
    lights = default_light(cams)
    dense = Renderer(field, Background("white"), RenderConfig(sampler="dense"))
    occ = Renderer(field, Background("white"), RenderConfig(sampler="torch", occupancy_warmup=1000))
    torch.manual_seed(0)
    for _ in range(30):  # nerfacc samples one random point per cell per update; the EMA keeps the max
        occ.update_occupancy(0, force=True)
    assert 0 < occ.occupancy_fraction() < 0.1
    for mode in ("lit", "textureless", "albedo", "normals"):
        a = dense.render(cams, lights, 32, 32, mode)
        b = occ.render(cams, lights, 32, 32, mode)
        # the same image, up to thin slivers of surface that nerfacc's random cell probes missed
        diff = (a["image"] - b["image"]).abs()
        assert diff.mean() < 1e-3 and diff.max() < 0.05, (mode, diff.mean(), diff.max())
        assert b["n_samples"] * 5 < a["n_samples"]
    assert a["opacity"].amax() > 0.99 and a["opacity"][..., 0, 0].max() < 1e-3


def test_gradients_reach_the_grid_through_samples_and_normals():
    field = _ball_field(res=16)
    renderer = Renderer(field, Background("white"), RenderConfig(sampler="dense", samples_per_ray=48))
    cams = make_cameras(0.0, 0.0, 2.0, 1.0)
    out = renderer.render(cams, default_light(cams), 16, 16, "textureless")
    out["image"].mean().backward()
    assert field.density_grid.grad is not None and field.density_grid.grad.abs().sum() > 0
    assert field.albedo_grid.grad is None or field.albedo_grid.grad.abs().sum() == 0  # textureless ignores albedo


def test_normals_of_a_ball_face_the_camera_and_albedo_follows_the_grid():
    field = _ball_field()
    renderer = Renderer(field, Background("white"), RenderConfig(sampler="dense"))
    cams = make_cameras(0.0, 0.0, 2.0, 1.0)  # camera on +X
    out = renderer.render(cams, default_light(cams), 32, 32, "albedo")
    centre = out["image"][0, :, 16, 16]
    assert centre[0] > 0.7 and centre[1] < 0.3  # red side faces +X
    lit_out = renderer.render(cams, default_light(cams), 32, 32, "lit")
    n = lit_out["normal"][0, :, 16, 16]
    n = n / n.norm()
    assert n[0] > 0.9  # pointing back at the camera
    lit = lit_out["image"][0, :, 16, 16]
    assert torch.all(lit <= centre + 1e-5)  # Lambertian factor l_p cos + l_a <= 0.95 here


def test_a_background_per_image_replaces_the_scenes():
    """render(background=...) puts a solid colour behind each image: where rays leave the scene
    it is that colour, elsewhere the render on white mixed with it by the opacity; the opacity
    itself is unchanged, and gradients still reach the grid through it."""
    field = _ball_field(res=16)
    renderer = Renderer(field, Background("white"), RenderConfig(sampler="dense", samples_per_ray=48))
    cams = make_cameras(torch.tensor([0.0, 90.0]), 0.0, 2.0, 1.0)
    lights = default_light(cams)
    bg = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.0, 0.0]])
    on_white = renderer.render(cams, lights, 16, 16, "lit")
    on_colour = renderer.render(cams, lights, 16, 16, "lit", background=bg)
    assert torch.equal(on_white["opacity"], on_colour["opacity"])
    a = on_white["opacity"]
    assert torch.allclose(on_colour["image"], on_white["image"] + (1 - a) * (bg[:, :, None, None] - 1), atol=1e-5)
    assert torch.allclose(on_colour["image"][:, :, 0, 0], bg, atol=1e-4)  # a corner: no ball
    on_colour["image"].mean().backward()
    assert field.density_grid.grad.abs().sum() > 0


def test_packed_transmittance_and_weights_by_hand():
    """Two rays of packed samples: ray 0 with sigma * dt = 1, 2 (dt 0.5), ray 1 with one sample of
    sigma * dt = 0.1. T = exp(-the optical depth before), weight = T (1 - exp(-sigma dt))."""
    ray_idx = torch.tensor([0, 0, 1])
    t0, t1 = torch.tensor([0.0, 0.5, 2.0]), torch.tensor([0.5, 1.0, 2.5])
    sigmas = torch.tensor([2.0, 4.0, 0.2], requires_grad=True)
    e = math.exp
    want_t = [1.0, e(-1), 1.0]
    want_w = [1 - e(-1), e(-1) * (1 - e(-2)), 1 - e(-0.1)]
    assert torch.allclose(packed_transmittance(t0, t1, sigmas.detach(), ray_idx), torch.tensor(want_t))
    w = packed_weights(t0, t1, sigmas, ray_idx)
    assert torch.allclose(w, torch.tensor(want_w))
    w.sum().backward()  # d/d sigma_0 of (1 - e^{-0.5 s0}) + e^{-0.5 s0} (1 - e^{-2}) = 0.5 e^{-1} e^{-2}
    assert torch.allclose(sigmas.grad[0], torch.tensor(0.5 * e(-3)))


def test_packed_weights_are_nerfaccs_batched_weights_with_their_gradient():
    import nerfacc

    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 20, (40,), generator=gen)
    ray_idx = torch.repeat_interleave(torch.arange(40), counts)
    n = ray_idx.numel()
    t0 = torch.rand(n, generator=gen)
    t1 = t0 + 0.1 * torch.rand(n, generator=gen)
    sigmas = (60 * torch.rand(n, generator=gen)).requires_grad_()
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n) - first[ray_idx]
    dense = lambda v: torch.zeros(40, int(counts.max())).index_put((ray_idx, slot), v)  # noqa: E731
    want = nerfacc.render_weight_from_density(dense(t0), dense(t1), dense(sigmas))[0][ray_idx, slot]
    got = packed_weights(t0, t1, sigmas, ray_idx)
    assert torch.allclose(got, want, atol=1e-6)
    v = torch.randn(n, generator=gen)
    (g_got,) = torch.autograd.grad((got * v).sum(), sigmas)
    (g_want,) = torch.autograd.grad((want * v).sum(), sigmas)
    assert torch.allclose(g_got, g_want, atol=1e-6)


def test_early_ray_termination_keeps_the_image_and_gradient_with_fewer_samples():
    """A solid ball: the samples behind its front surface are dropped (transmittance below 1e-4).
    The lit image and the opacity are what shading every sample gives, and so is the grids'
    gradient through the albedo and the density (albedo shading: no normals). With normals, the
    dropped samples inside, where the density is flat and its normalised gradient's derivative
    is 1 / |gradient|, would add large terms of no use; those are gone (not compared)."""
    cams = make_cameras([0.0, 120.0], [10.0, 40.0], 2.0, 1.0)
    lights = default_light(cams)
    out, grads = {}, {}
    for eps in (0.0, 1e-4):
        field = _ball_field(radius=0.5, peak=60.0, sharpness=1000.0)  # opaque a few steps in
        renderer = Renderer(field, Background("white"), RenderConfig(sampler="torch", occupancy_warmup=1000, early_stop_eps=eps))
        torch.manual_seed(0)
        for _ in range(30):
            renderer.update_occupancy(0, force=True)
        out[eps] = renderer.render(cams, lights, 24, 24, "lit")
        albedo = renderer.render(cams, lights, 24, 24, "albedo")
        (albedo["image"].sum() + albedo["opacity"].sum()).backward()
        grads[eps] = field.density_grid.grad.clone(), field.albedo_grid.grad.clone()
    full, early = out[0.0], out[1e-4]
    assert early["n_samples"] * 2 < full["n_samples"]
    assert (full["image"] - early["image"]).abs().max() < 1e-3
    assert (full["opacity"] - early["opacity"]).abs().max() < 1e-3
    for g_full, g_early in zip(grads[0.0], grads[1e-4], strict=True):
        assert g_full.abs().max() > 0
        assert (g_full - g_early).abs().max() < 1e-3 * g_full.abs().max()


def test_trilinear_corners_by_hand():
    """A point at (x, y, z) = (0.25, 1, 1) in node units of a (D, H, W) = (2, 3, 5) volume: x lies
    between nodes 0 and 1 (weights 0.75, 0.25), y on node 1 (weights 1 and 0 towards node 2), z on
    the last node (weight 1, and 0 for a node past it, clamped onto it)."""
    d, h, w = 2, 3, 5
    coords = torch.tensor([[0.25 / (w - 1) * 2 - 1, 0.0, 1.0]])
    nodes, weights = trilinear_corners(coords, (d, h, w))
    flat = lambda z, y, x: (z * h + y) * w + x  # noqa: E731
    # grid_sample's corner order: x fastest, then y, then z; z's far node (2) is clamped onto 1
    assert nodes[0].tolist() == [flat(1, 1, 0), flat(1, 1, 1), flat(1, 2, 0), flat(1, 2, 1)] * 2
    assert weights[0].tolist() == [0.75, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # a point outside the box is clipped onto its border (grid_sample's border padding)
    nodes, weights = trilinear_corners(torch.tensor([[-3.0, -1.0, -1.0]]), (d, h, w))
    assert nodes[0, 0] == 0 and weights[0, 0] == 1.0 and weights[0, 1:].abs().sum() == 0


def test_trilinear_volume_grad_is_grid_samples_backward_bit_for_bit():
    """The field's lookup keeps ATen's forward and replaces its CPU backward: the same gradient,
    to the last bit (the same products, added to each node in the same order), with points on the
    faces, the corners and outside the box (clipped), and many points sharing nodes."""
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(1, 5, 6, 7, 8, generator=g, requires_grad=True)
    points = torch.rand(3000, 3, generator=g) * 2.4 - 1.2
    points[:40] = torch.tensor([1.0, -1.0, 1.0])
    points[40:80, 0] = 1.0
    points[80:2000] = points[80:2000] * 0.05  # crowded: each node gets many additions
    coords = points.view(1, 1, 1, -1, 3)
    out = F.grid_sample(volume, coords, mode="bilinear", padding_mode="border", align_corners=True)
    grad_out = torch.randn(out.shape, generator=g)
    (expected,) = torch.autograd.grad(out, volume, grad_out)
    assert torch.equal(trilinear_volume_grad(grad_out, points, volume.shape), expected)


def test_grid_field_gradients_are_atens_bit_for_bit():
    """GridField's CPU lookup (ATen forward, index_add backward) against plain ``F.grid_sample``
    on the same field: identical outputs and identical gradients on both grids."""
    g = torch.Generator().manual_seed(1)
    field = GridField(FieldConfig(resolution=16))
    with torch.no_grad():
        field.density_grid.normal_(generator=g)
        field.albedo_grid.normal_(generator=g)
    points = (torch.rand(5000, 3, generator=g) * 2 - 1) * field.cfg.bound

    def run() -> tuple[torch.Tensor, ...]:
        field.zero_grad()
        out = field(points)
        (out["density"].sum() + out["albedo"].square().sum() + (out["normals"] * torch.tensor([0.3, -1.0, 2.0])).sum()).backward()
        return out["density"].detach(), field.density_grid.grad.clone(), field.albedo_grid.grad.clone()

    fast = run()
    points.requires_grad_(True)  # a gradient to the points: the field uses ATen's own backward
    slow = run()
    assert points.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
