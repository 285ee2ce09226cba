"""The signed distance part of a run (FieldConfig.sdf_fraction): the grid's conversion, the Laplace
density, the eikonal term, and the trainer's switch, checkpoint and resume."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from dreamfusion.config import FieldConfig
from dreamfusion.field import GridField, density_activation, signed_distance_grid
from dreamfusion.losses import eikonal_penalty, loss_terms
from dreamfusion.trainer import Trainer

PROMPT = "a red cube"


def test_signed_distance_grid_by_hand():
    """A slab of nodes 3..6 along the last axis: inside, the distance to the nearest outside node
    less half a voxel; outside, minus the distance to the nearest inside node less half a voxel."""
    inside = np.zeros((1, 1, 10), dtype=bool)
    inside[..., 3:7] = True
    sdf = signed_distance_grid(inside, voxel=0.1)[0, 0]
    expected = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 1.5, 0.5, -0.5, -1.5, -2.5]) * 0.1
    assert np.allclose(sdf, expected)
    # diagonal distances are Euclidean: the node (2, 2) of a 5x5 square's outside corner region
    square = np.zeros((1, 5, 5), dtype=bool)
    square[0, :2, :2] = True
    assert signed_distance_grid(square, 1.0)[0, 2, 2] == pytest.approx(-(math.sqrt(2) - 0.5))
    assert (signed_distance_grid(np.ones((3, 3, 3), bool), 0.1) > 0).all()
    assert (signed_distance_grid(np.zeros((3, 3, 3), bool), 0.1) < 0).all()


def test_laplace_density_by_hand():
    """VolSDF: (1 / beta) Psi_beta(s), Psi the Laplace CDF: 1/2 at the surface, (1 - e^-1 / 2) one
    scale inside, e^-1 / 2 one scale outside."""
    beta = 0.02
    raw = torch.tensor([0.0, beta, -beta, 1.0, -1.0])
    got = density_activation(raw, "laplace", beta)
    e = math.exp(-1.0)
    assert got[:3].tolist() == pytest.approx([0.5 / beta, (1 - 0.5 * e) / beta, 0.5 * e / beta])
    assert got[3].item() == pytest.approx(1 / beta) and 0 <= got[4].item() < 1e-12


def _plane_field(slope: float) -> GridField:
    field = GridField(FieldConfig(resolution=16, bound=1.0))
    z = torch.linspace(-1, 1, 16).view(16, 1, 1).expand(16, 16, 16)
    with torch.no_grad():
        field.density_grid.copy_((slope * (0.1 - z))[None, None])  # inside below z = 0.1
    field.sdf_beta.fill_(0.01)
    return field


def test_eikonal_penalty_by_hand():
    """A plane's signed distance (slope 1) costs nothing; slope 2 costs (2 - 1)^2 = 1 in the band
    (the grid's own values: no blob once it is a signed distance)."""
    assert eikonal_penalty(_plane_field(1.0)).item() == pytest.approx(0.0, abs=1e-10)
    assert eikonal_penalty(_plane_field(2.0)).item() == pytest.approx(1.0, rel=1e-5)
    slope = _plane_field(2.0)
    slope.density_grid.grad = None
    eikonal_penalty(slope).backward()
    assert slope.density_grid.grad.abs().sum() > 0


def _rippled_plane(amplitude: float) -> GridField:
    field = _plane_field(1.0)
    x = torch.linspace(-1, 1, 16).view(1, 1, 16).expand(16, 16, 16)
    with torch.no_grad():
        field.density_grid.add_((amplitude * torch.sin(12 * x))[None, None])
    return field


def test_normal_variation_is_zero_on_a_plane_and_grows_with_a_ripple():
    """The normal of a plane does not turn; on a rippled one it turns more the deeper the ripple
    (nearly linearly: the penalty is nearly L1), and the term pulls the grid back."""
    from dreamfusion.losses import normal_variation

    assert normal_variation(_plane_field(1.0)).item() == pytest.approx(0.0, abs=1e-9)
    small, large = normal_variation(_rippled_plane(0.01)), normal_variation(_rippled_plane(0.04))
    assert 0 < small.item() and 2.5 < large.item() / small.item() < 4.5
    field = _rippled_plane(0.04)
    normal_variation(field).backward()
    with torch.no_grad():
        field.density_grid.sub_(1e-3 * field.density_grid.grad.sign())
    assert normal_variation(field).item() < large.item()


def _whole_grid_terms(s: torch.Tensor, voxel: float, band_voxels: float = 3.0, eps: float = 0.01):
    """Both terms computed on the whole grid, as written the first time: the reference the cropped
    ones must equal."""
    g = torch.stack(torch.gradient(s, spacing=voxel, dim=(0, 1, 2)))
    norm = torch.sqrt((g * g).sum(0) + 1e-12)
    band = s.detach().abs() < band_voxels * voxel
    eikonal = ((norm - 1) ** 2 * band).sum() / band.sum()
    n = g / norm
    total, count = 0.0, 0
    for dim in (1, 2, 3):
        r = n.shape[dim]
        d = n.narrow(dim, 1, r - 1) - n.narrow(dim, 0, r - 1)
        both = band.narrow(dim - 1, 1, r - 1) & band.narrow(dim - 1, 0, r - 1)
        total = total + ((torch.sqrt((d * d).sum(0) + eps * eps) - eps) * both).sum()
        count = count + both.sum()
    return eikonal, total / count


def test_the_terms_on_the_box_around_the_surface_equal_the_whole_grids():
    """A bumpy sphere's signed distance, off centre: the terms and their gradients computed on the
    box around the surface are the whole grid's."""
    from dreamfusion.losses import normal_variation

    field = GridField(FieldConfig(resolution=40, bound=1.0))
    axis = torch.linspace(-1, 1, 40, dtype=torch.float64)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    sphere = 0.35 - ((x - 0.2) ** 2 + (y + 0.1) ** 2 + z ** 2).sqrt() + 0.02 * torch.sin(9 * x) * torch.cos(7 * z)
    field = field.double()
    with torch.no_grad():
        field.density_grid.copy_(sphere[None, None])
    field.sdf_beta.fill_(0.01)
    whole = torch.nn.Parameter(sphere.clone())
    for k, term in enumerate((eikonal_penalty, normal_variation)):
        got, ref = term(field), _whole_grid_terms(whole, field.voxel_size)[k]
        assert got.item() == pytest.approx(ref.item(), rel=1e-10)
        field.density_grid.grad, whole.grad = None, None
        got.backward()
        ref.backward()
        assert torch.allclose(field.density_grid.grad[0, 0], whole.grad, atol=1e-12)


def test_the_density_terms_apply_to_one_kind_of_grid_each():
    """The density's TV acts on a density grid and the eikonal term on a signed distance grid only."""
    from dreamfusion.config import OptimConfig

    weights = OptimConfig(tv_weight=1.0, eikonal_weight=1.0, opacity_weight=1.0, sdf_smoothness_weight=1.0)
    terms = {t.name: t for t in loss_terms(weights, signed_distance=True)}
    out = {"opacity": torch.full((2, 1, 4, 4), 0.5)}
    density = GridField(FieldConfig(resolution=8))
    with torch.no_grad():
        density.density_grid.normal_()
    assert terms["tv"].value(out, density).item() > 0 and terms["opacity"].value(out, density).item() > 0
    assert terms["eikonal"].value(out, density).item() == 0 and terms["sdf_smoothness"].value(out, density).item() == 0
    sdf = _rippled_plane(0.04)
    assert terms["tv"].value(out, sdf).item() == 0 and terms["opacity"].value(out, sdf).item() == 0
    assert terms["eikonal"].value(out, sdf).item() > 0 and terms["sdf_smoothness"].value(out, sdf).item() > 0


def test_to_sdf_keeps_the_surface_and_bakes_in_the_blob():
    """A density ball (the blob alone, raw = 5 (1 - |x| / 0.5)) turned into a signed distance at
    density e^0 = 1: the zero crossing at radius 0.5 within a voxel, distances of slope about one,
    the Laplace density from then on, and no blob added any more."""
    field = GridField(FieldConfig(resolution=33, bound=1.0, blob_density=5.0, blob_radius=0.5, density_activation="exp"))
    assert not field.is_sdf
    field.to_sdf(level=1.0, beta=0.02)
    assert field.is_sdf and float(field.sdf_beta) == pytest.approx(0.02)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, -0.7]])
    raw = field.raw_density(x, field._sample(field.density_grid, x)[:, 0])
    voxel = field.voxel_size
    assert raw[2].abs() < voxel and raw[1].item() == pytest.approx(0.2, abs=voxel) and raw[3].item() == pytest.approx(-0.2, abs=voxel)
    assert field.density(x[:1]).item() == pytest.approx(1 / 0.02, rel=1e-3)


@pytest.fixture(scope="module")
def guidance(tiny_prior_dir):
    from dreamfusion.guidance import GuidanceConfig, load_guidance

    return load_guidance(GuidanceConfig(model=str(tiny_prior_dir)))


def _sdf_config(fast_config):
    return dataclasses.replace(fast_config, steps=6, field=dataclasses.replace(fast_config.field, sdf_fraction=0.5))


def test_the_grid_becomes_a_signed_distance_at_its_fraction_of_the_run(fast_config, guidance):
    trainer = Trainer(_sdf_config(fast_config), PROMPT, guidance=guidance)
    assert trainer.sdf_start_step() == 3
    trainer.run(3)
    assert not trainer.field.is_sdf
    trainer.step()
    assert trainer.field.is_sdf and float(trainer.field.sdf_beta) == pytest.approx(trainer.cfg.field.sdf_beta_start)
    assert trainer.optimizer.param_groups[0]["base_lr"] == trainer.cfg.optim.lr_sdf
    assert trainer.optimizer.param_groups[0]["eps"] == trainer.cfg.optim.sdf_adam_eps
    assert "eikonal" in trainer.history[-1]
    trainer.run()
    assert float(trainer.field.sdf_beta) == pytest.approx(trainer.cfg.field.sdf_beta)  # the scale's schedule is done by the end
    density_only = dataclasses.replace(fast_config, field=dataclasses.replace(fast_config.field, sdf_fraction=0.0))
    assert Trainer(density_only, PROMPT, guidance=guidance).sdf_start_step() is None


def test_a_scene_with_nothing_solid_stays_a_density_and_says_so(fast_config, guidance):
    """An empty scene at the switch (no blob, nothing formed) cannot become a signed distance: the
    run goes on as a density, with one message, instead of failing."""
    empty = dataclasses.replace(fast_config.field, sdf_fraction=0.5, density_shift=-30.0)
    trainer = Trainer(dataclasses.replace(fast_config, steps=6, field=empty), PROMPT, guidance=guidance)
    messages = []
    trainer.on_message = messages.append
    trainer.run()
    assert trainer.step_count == 6 and not trainer.field.is_sdf
    assert len(messages) == 1 and "stays a density" in messages[0]


@pytest.mark.parametrize("stop_at", [2, 4], ids=["before-the-switch", "after-the-switch"])
def test_resume_across_the_switch_is_exact(fast_config, guidance, tmp_path, stop_at):
    """A run stopped before or after its grid became a signed distance resumes to the same grid,
    and its checkpoint says which kind of grid it holds."""
    cfg = _sdf_config(fast_config)
    straight = Trainer(cfg, PROMPT, guidance=guidance)
    straight.run()
    first = Trainer(cfg, PROMPT, guidance=guidance)
    first.run(stop_at)
    resumed = Trainer.from_checkpoint(first.save_checkpoint(tmp_path / "c.safetensors"), guidance=guidance)
    assert resumed.field.is_sdf == first.field.is_sdf == (stop_at > 3)
    resumed.run()
    assert resumed.field.is_sdf
    assert torch.allclose(resumed.field.density_grid, straight.field.density_grid, atol=1e-6)
