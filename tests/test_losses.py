"""The loss terms and the scene's parametrisation against hand computations: total variation,
opacity entropy, the learning-rate schedule, exp density, grid growth, and the export's choice of
the surface level from silhouettes."""

from __future__ import annotations

import math

import pytest
import torch

from dreamfusion.cameras import make_cameras
from dreamfusion.config import FieldConfig, OptimConfig, RenderConfig
from dreamfusion.export import silhouette_level
from dreamfusion.field import Background, GridField, density_activation, upsample_grid
from dreamfusion.losses import loss_terms, opacity_entropy, opacity_sparsity, orientation_penalty, ramp, total_variation
from dreamfusion.render import Renderer
from dreamfusion.trainer import lr_factor


def test_total_variation_value_and_gradient_by_hand():
    g = torch.zeros(1, 1, 2, 2, 2)
    g[0, 0, 1, 1, 1] = 2.0  # one corner voxel raised by 2
    g.requires_grad_(True)
    tv = total_variation(g)
    # three neighbours differ by 2: (3 * 4) / 8 voxels
    assert float(tv.detach()) == pytest.approx(12 / 8)
    tv.backward()
    # d/dg[corner] = sum over its 3 neighbour pairs of 2 (g - n) / 8 = 3 * 4 / 8
    assert float(g.grad[0, 0, 1, 1, 1]) == pytest.approx(1.5)
    assert float(g.grad[0, 0, 0, 1, 1]) == pytest.approx(-0.5)  # a neighbour: -2 * 2 / 8
    assert float(g.grad[0, 0, 0, 0, 0]) == 0.0
    assert float(total_variation(torch.full((1, 3, 4, 4, 4), 7.0))) == 0.0


def test_total_variation_gradient_is_autograds_of_the_formula():
    """The written-out gradient against autograd through the plain formula, on a random grid with
    unequal sides (so an axis mix-up shows)."""
    g = torch.randn(1, 2, 5, 6, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    plain = (torch.diff(g, dim=2) ** 2).sum() + (torch.diff(g, dim=3) ** 2).sum() + (torch.diff(g, dim=4) ** 2).sum()
    plain = plain / (5 * 6 * 7)
    (expected,) = torch.autograd.grad(3.0 * plain, g)
    tv = total_variation(g)
    (got,) = torch.autograd.grad(3.0 * tv, g)
    assert float(tv.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_opacity_terms_by_hand():
    a = torch.tensor([0.0, 1.0, 0.5, 0.5])
    assert float(opacity_entropy(a)) == pytest.approx(0.5 * math.log(2), abs=2e-3)  # the ends are clamped at 1e-4
    assert float(opacity_sparsity(a)) == pytest.approx(0.5)
    assert float(orientation_penalty(torch.tensor([[0.0, 2.0]]))) == pytest.approx(1.0)
    x = torch.tensor([0.3], requires_grad=True)
    opacity_entropy(x).backward()
    assert float(x.grad) == pytest.approx(-math.log(0.3 / 0.7), rel=1e-4)  # pushes towards the nearer end


def test_loss_terms_are_named_weighted_and_scheduled():
    cfg = OptimConfig(orientation_weight=10.0, orientation_ramp=0.5, opacity_weight=2.0, entropy_weight=0.0, tv_weight=3.0, tv_albedo_weight=0.0)
    terms = {t.name: t for t in loss_terms(cfg)}
    assert list(terms) == ["orientation", "opacity", "tv"]  # zero weights are left out, and a signed distance grid's terms
    assert [t.name for t in loss_terms(cfg, signed_distance=True)] == ["orientation", "opacity", "tv", "eikonal", "sdf_smoothness"]
    assert terms["orientation"].weight(0.0) == 0.0 and terms["orientation"].weight(0.25) == 5.0 and terms["orientation"].weight(0.9) == 10.0
    assert terms["tv"].weight(0.7) == 3.0
    assert ramp(0.3, 0.0) == 1.0 and ramp(-1, 0.5) == 0.0


def test_lr_factor_schedule():
    assert lr_factor(0.2, 0.5, 0.1) == 1.0
    assert lr_factor(0.5, 0.5, 0.1) == 1.0
    assert lr_factor(0.75, 0.5, 0.1) == pytest.approx(0.1 ** 0.5)
    assert lr_factor(1.0, 0.5, 0.1) == pytest.approx(0.1)
    assert lr_factor(0.9, 1.0, 0.1) == 1.0


def test_density_activations():
    raw = torch.tensor([-50.0, 0.0, 2.0, 40.0])
    assert torch.allclose(density_activation(raw, "softplus"), torch.nn.functional.softplus(raw))
    exp = density_activation(raw, "exp")
    assert torch.allclose(exp[:3], torch.exp(raw[:3]))
    assert float(exp[3]) == pytest.approx(math.exp(15.0))  # truncated: one bad step cannot overflow


def _ball_field(res: int, radius: float = 0.5, activation: str = "softplus") -> GridField:
    field = GridField(FieldConfig(resolution=res, blob_density=0.0, density_activation=activation))
    lin = torch.linspace(-1, 1, res)
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    r = torch.sqrt(x * x + y * y + z * z)
    with torch.no_grad():
        field.density_grid[0, 0] = (20.0 * (radius - r)).clamp(-10.0, 10.0)
        field.albedo_grid[0, 0] = x * 3
    return field


def test_growing_the_grid_keeps_the_render():
    """Coarse-to-fine: resampling the grid to a finer resolution renders (nearly) the same image."""
    field = _ball_field(16)
    scene = Renderer(field, Background("white"), RenderConfig(sampler="dense", samples_per_ray=64))
    cams = make_cameras([0.0, 130.0], [20.0, -20.0], 1.9, 1.27)
    from dreamfusion.cameras import default_light

    before = scene.render(cams, default_light(cams), 32, 32, "lit")["image"].detach()
    field.grow(32)
    assert field.resolution == 32 and field.density_grid.shape == (1, 1, 32, 32, 32) and field.albedo_grid.shape == (1, 3, 32, 32, 32)
    after = scene.render(cams, default_light(cams), 32, 32, "lit")["image"].detach()
    diff = (before - after).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.2
    # the same field at the nodes of the coarse grid: trilinear upsampling is exact on a linear ramp
    ramp_grid = torch.linspace(0, 1, 5).view(1, 1, 1, 1, 5).expand(1, 1, 5, 5, 5)
    fine = upsample_grid(ramp_grid, 9)
    assert torch.allclose(fine[0, 0, 3, 3], torch.linspace(0, 1, 9), atol=1e-6)


def test_silhouette_level_finds_the_level_of_a_sphere():
    """A density that falls linearly through the surface of a sphere of radius 0.4: renders of it
    have opacity 0.5 about where the density first reaches 5 (steep enough to be nearly opaque
    beyond); the chosen level's surface must be within a voxel of the rendered silhouette."""
    res, bound = 64, 1.0
    field = GridField(FieldConfig(resolution=res, bound=bound, blob_density=0.0, density_activation="exp"))
    lin = torch.linspace(-bound, bound, res)
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    r = torch.sqrt(x * x + y * y + z * z)
    with torch.no_grad():
        field.density_grid[0, 0] = torch.log((400.0 * (0.4 - r)).clamp(1e-4, 400.0))  # density 400 (0.4 - r) inside
    scene = Renderer(field, Background("white"), RenderConfig(sampler="dense", samples_per_ray=192))
    cams = make_cameras(torch.arange(6.0) * 60.0, torch.tensor([-25.0, 25.0] * 3), 1.9, 1.27)
    opacity, peak = scene.opacity_and_max_density(cams, 64)
    level = silhouette_level(opacity, peak)
    # the level's sphere: 400 (0.4 - r) = level  ->  r = 0.4 - level / 400
    r_level = 0.4 - level / 400.0
    # the rendered silhouette's radius: opacity 0.5 along the central row, converted to world units
    row = opacity[0, 32]
    width_px = float((row > 0.5).sum())
    r_silhouette = width_px / 2 / 64 / 1.27 * 1.9  # half-width in image widths, times distance / focal
    voxel = 2 * bound / (res - 1)
    assert abs(r_level - r_silhouette) < voxel, (level, r_level, r_silhouette)
    with pytest.raises(ValueError, match="nothing to export"):
        silhouette_level(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))


def test_grid_resolution_schedule():
    from dreamfusion.field import grid_resolution

    cfg = FieldConfig(resolution=48, coarse_resolutions=(16, 32), coarse_fraction=0.3)
    assert [grid_resolution(cfg, f) for f in (0.0, 0.149, 0.15, 0.299, 0.3, 0.9)] == [16, 16, 32, 32, 48, 48]
    assert grid_resolution(FieldConfig(resolution=40), 0.0) == 40
    assert GridField(cfg).resolution == 16


def test_trainer_grows_its_grid_and_resumes_across_growth(fast_config, tmp_path):
    import dataclasses

    from dreamfusion.trainer import Trainer

    cfg = dataclasses.replace(fast_config, steps=8, field=dataclasses.replace(fast_config.field, coarse_resolutions=(12,), coarse_fraction=0.5))
    straight = Trainer(cfg, "a red cube")
    assert straight.field.resolution == 12
    straight.run(4)
    assert straight.field.resolution == 12
    straight.run(1)  # the fifth step starts at half the run: the grid grows first
    assert straight.field.resolution == 24 and straight.optimizer.param_groups[0]["params"][0] is straight.field.density_grid
    path = straight.save_checkpoint(tmp_path / "c.safetensors")
    straight.run()
    resumed = Trainer.from_checkpoint(path)
    assert resumed.field.resolution == 24
    resumed.run()
    assert torch.allclose(resumed.field.density_grid, straight.field.density_grid, atol=1e-6)


# ----------------------------------------------------------------------------- solid exports


def _shells(n: int = 40):
    c = (torch.arange(n) - (n - 1) / 2).float()
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.sqrt(x * x + y * y + z * z)
    sphere_shell = ((r > 12) & (r < 15)).numpy()
    cup = (((x * x + y * y).sqrt() < 15) & ((x * x + y * y).sqrt() > 12) & (z.abs() < 12)) | (((x * x + y * y).sqrt() < 15) & (z > -15) & (z < -11))
    ring_r = (x * x + y * y).sqrt()
    torus = ((ring_r - 12) ** 2 + z * z < 16).numpy()
    return sphere_shell, cup.numpy(), torus, r.numpy()


def test_void_filling_makes_shells_solid_and_leaves_holes_open():
    import numpy as np

    from dreamfusion.export import axis_enclosed, fill_enclosed

    sphere_shell, cup, torus, r = _shells()
    as_grid = lambda solid: solid.astype(np.float32) * 10.0  # noqa: E731 - density 10 inside, 0 outside
    # a closed shell: both rules fill it (nothing can see its inside)
    for mode in ("enclosed", "axes"):
        filled = fill_enclosed(as_grid(sphere_shell), 5.0, mode) > 5.0
        assert filled[r < 12].all() and not filled[r > 15.5].any()
    assert np.array_equal(fill_enclosed(as_grid(sphere_shell), 5.0, "none") > 5.0, sphere_shell)
    # a cup open at the top: not enclosed, but enclosed from 5 of 6 axis directions
    assert not (fill_enclosed(as_grid(cup), 5.0, "enclosed") > 5.0)[20, 20, 25]
    assert (fill_enclosed(as_grid(cup), 5.0, "axes") > 5.0)[20, 20, 25]
    # a torus's hole is open up and down: only 4 axes run into the ring, it stays empty
    assert axis_enclosed(torus)[20, 20, 20] == False  # noqa: E712
    assert not (fill_enclosed(as_grid(torus), 5.0, "axes") > 5.0)[19:21, 19:21, :].any()
    with pytest.raises(ValueError, match="void filling"):
        fill_enclosed(as_grid(torus), 5.0, "everything")


def test_blob_fades_inside_and_keeps_its_outside():
    from dreamfusion.field import blob_bias, blob_bias_gradient

    p = torch.tensor([[0.1, 0.0, 0.0], [0.4, 0.0, 0.0]])
    assert torch.allclose(blob_bias(p, 5.0, 0.2), torch.tensor([2.5, -5.0]))
    assert torch.allclose(blob_bias(p, 5.0, 0.2, inner_scale=0.2), torch.tensor([0.5, -5.0]))
    q = p.clone().requires_grad_(True)
    blob_bias(q, 5.0, 0.2, inner_scale=0.2).sum().backward()
    assert torch.allclose(blob_bias_gradient(p, 5.0, 0.2, inner_scale=0.2), q.grad)
