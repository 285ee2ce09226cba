"""The loss terms beside the guidance, each a pure function of tensors, and the named, weighted,
scheduled list of them that the trainer sums (as threestudio does): adding or ablating a term
means a pure function and a line in :func:`loss_terms` here and a weight in
:class:`~dreamfusion.config.OptimConfig`, not an edit of the loop.

Scale: the guidance's loss is a sum over pixels (its gradient per pixel is O(1)), so the weights
of per-pixel means below are large; each term's gradient norm can be logged to compare them
(``OptimConfig.grad_norm_every``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import OptimConfig


def orientation_penalty(orientation: torch.Tensor) -> torch.Tensor:
    """Ref-NeRF's orientation loss, already summed along each ray by the renderer
    (sum_i stopgrad(w_i) max(0, n_i . d)^2): mean over rays."""
    return orientation.mean()


def opacity_sparsity(opacity: torch.Tensor) -> torch.Tensor:
    """Mean accumulated opacity over pixels: against density filling empty space."""
    return opacity.mean()


def opacity_entropy(opacity: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Mean binary entropy of the pixels' opacity, -(a log a + (1 - a) log(1 - a)): zero for fully
    empty or fully opaque pixels, log 2 for half-transparent ones (fog)."""
    a = opacity.clamp(eps, 1 - eps)
    return -(a * a.log() + (1 - a) * (1 - a).log()).mean()


class _TotalVariation(torch.autograd.Function):
    """:func:`total_variation` with its gradient written out, 2 (d_in - d_out) / n per voxel for the
    differences d into and out of it along each axis: a third of autograd's time on a 64^3 grid
    (three slices, a square and a sum per axis, each with its backward); the same values but for
    the order of the float sums, so not bit for bit autograd's."""

    @staticmethod
    def forward(ctx, grid: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's signature
        diffs = [torch.diff(grid, dim=dim) for dim in (2, 3, 4)]
        ctx.save_for_backward(*diffs)
        ctx.shape = grid.shape
        ctx.n = grid.shape[2] * grid.shape[3] * grid.shape[4]
        return ((diffs[0] * diffs[0]).sum() + (diffs[1] * diffs[1]).sum() + (diffs[2] * diffs[2]).sum()) / ctx.n

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
        scale = grad / ctx.n
        for dim, d in zip((2, 3, 4), ctx.saved_tensors, strict=True):
            g = scale * (2 * d)
            length = ctx.shape[dim]
            out.narrow(dim, 1, length - 1).add_(g)
            out.narrow(dim, 0, length - 1).sub_(g)
        return out


def total_variation(grid: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of the squared differences to the next voxel along each axis, summed over
    the three axes and the channels: (1, C, R, R, R) -> scalar."""
    return _TotalVariation.apply(grid)


def _near_surface(field: torch.nn.Module, band_voxels: float, margin: int = 2) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The part of a signed distance grid around its surface: the grid (z, y, x) cropped to the box
    of the nodes within ``band_voxels`` of s = 0 plus ``margin`` nodes (so that central differences
    there, and between neighbours' normals, are the whole grid's), and which of its nodes are in
    that band; None when none is."""
    s = field.density_grid[0, 0]
    band = s.detach().abs() < band_voxels * field.voxel_size
    nodes = band.nonzero()
    if len(nodes) == 0:
        return None
    lo = (nodes.min(0).values - margin).clamp_min(0).tolist()
    hi = (nodes.max(0).values + margin + 1).clamp(max=torch.tensor(s.shape, device=s.device)).tolist()
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return s[box], band[box]


def _gradient(s: torch.Tensor, spacing: float) -> torch.Tensor:
    """Central differences (one-sided at the grid's faces) of a (z, y, x) grid: (3, Z, Y, X)."""
    dims = [d for d in range(3) if s.shape[d] > 1]
    grads = dict(zip(dims, torch.gradient(s, spacing=spacing, dim=dims), strict=True))
    return torch.stack([grads.get(d, torch.zeros_like(s)) for d in range(3)])


def eikonal_penalty(field: torch.nn.Module, band_voxels: float = 3.0) -> torch.Tensor:
    """Mean of (|grad s| - 1)^2 over the nodes of a signed distance grid s within ``band_voxels``
    of its surface s = 0 (computed on the box around them: the same numbers, a fraction of the cost)."""
    near = _near_surface(field, band_voxels)
    if near is None:
        return field.density_grid.sum() * 0.0
    s, band = near
    g = _gradient(s, field.voxel_size)
    norm = torch.sqrt((g * g).sum(0) + 1e-12)
    band = band.to(s.dtype)
    return ((norm - 1.0) ** 2 * band).sum() / band.sum().clamp_min(1.0)


def normal_variation(field: torch.nn.Module, band_voxels: float = 3.0, eps: float = 0.01) -> torch.Tensor:
    """How much the unit normal (grad s / |grad s|) of a signed distance grid turns between
    neighbouring nodes within ``band_voxels`` of the surface: the mean of a Charbonnier penalty
    sqrt(|dn|^2 + eps^2) - eps (nearly L1: ripples cost, one sharp crease costs no more than a
    soft one)."""
    near = _near_surface(field, band_voxels)
    if near is None:
        return field.density_grid.sum() * 0.0
    s, band = near
    g = _gradient(s, field.voxel_size)
    n = g / torch.sqrt((g * g).sum(0, keepdim=True) + 1e-12)
    total, count = s.new_zeros(()), s.new_zeros(())
    for dim in (1, 2, 3):
        size = n.shape[dim]
        if size < 2:
            continue
        d = n.narrow(dim, 1, size - 1) - n.narrow(dim, 0, size - 1)
        both = (band.narrow(dim - 1, 1, size - 1) & band.narrow(dim - 1, 0, size - 1)).to(s.dtype)
        total = total + ((torch.sqrt((d * d).sum(0) + eps * eps) - eps) * both).sum()
        count = count + both.sum()
    return total / count.clamp_min(1.0)


def ramp(fraction_done: float, ramp_fraction: float) -> float:
    """0 -> 1 linearly over the first ``ramp_fraction`` of the run (1 at once when it is 0)."""
    if ramp_fraction <= 0:
        return 1.0
    return min(1.0, max(0.0, fraction_done / ramp_fraction))


@dataclass(frozen=True)
class LossTerm:
    """A named regulariser: ``value(render_out, field)`` -> scalar tensor, its weight ``scale``
    (a setting of :class:`~dreamfusion.config.OptimConfig`) and its ``schedule`` over the run
    (fraction done -> multiplier, 1 throughout unless given)."""

    name: str
    value: Callable[[dict, torch.nn.Module], torch.Tensor]
    scale: float
    schedule: Callable[[float], float] = lambda frac: 1.0

    def weight(self, fraction_done: float) -> float:
        return self.scale * self.schedule(fraction_done)


def _zero(field: torch.nn.Module) -> torch.Tensor:
    """A term that does not apply to the field as it is now (the density's TV and the opacity's
    sparsity on a signed distance grid, the eikonal term on a density)."""
    return field.density_grid.new_zeros(())


def loss_terms(cfg: OptimConfig, signed_distance: bool = False) -> list[LossTerm]:
    """The regularisers with a non-zero weight under ``cfg``, in a fixed order: the one table of
    them. A new term is a pure function above, a line here and its weight in ``OptimConfig``.
    ``signed_distance``: the run's grid becomes a signed distance at some point (FieldConfig.sdf_fraction),
    so the terms of one (eikonal, smoothness) are in the table too; each term acts on the kind of
    grid it is for and is 0 on the other."""
    terms = [
        LossTerm("orientation", lambda out, field: orientation_penalty(out["orientation"]), cfg.orientation_weight,
                 lambda frac: ramp(frac, cfg.orientation_ramp)),
        LossTerm("opacity", lambda out, field: _zero(field) if field.is_sdf else opacity_sparsity(out["opacity"]), cfg.opacity_weight),
        LossTerm("entropy", lambda out, field: opacity_entropy(out["opacity"]), cfg.entropy_weight),
        LossTerm("tv", lambda out, field: _zero(field) if field.is_sdf else total_variation(field.density_grid), cfg.tv_weight),
        LossTerm("eikonal", lambda out, field: eikonal_penalty(field) if field.is_sdf else _zero(field), cfg.eikonal_weight),
        LossTerm("sdf_smoothness", lambda out, field: normal_variation(field) if field.is_sdf else _zero(field), cfg.sdf_smoothness_weight),
        LossTerm("tv_albedo", lambda out, field: total_variation(field.albedo_grid), cfg.tv_albedo_weight),
    ]
    sdf_only = ("eikonal", "sdf_smoothness")
    return [t for t in terms if t.scale != 0 and (signed_distance or t.name not in sdf_only)]
