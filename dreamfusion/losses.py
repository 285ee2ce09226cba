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


def loss_terms(cfg: OptimConfig) -> list[LossTerm]:
    """The regularisers with a non-zero weight under ``cfg``, in a fixed order: the one table of
    them. A new term is a pure function above, a line here and its weight in ``OptimConfig``."""
    terms = [
        LossTerm("orientation", lambda out, field: orientation_penalty(out["orientation"]), cfg.orientation_weight,
                 lambda frac: ramp(frac, cfg.orientation_ramp)),
        LossTerm("opacity", lambda out, field: opacity_sparsity(out["opacity"]), cfg.opacity_weight),
        LossTerm("entropy", lambda out, field: opacity_entropy(out["opacity"]), cfg.entropy_weight),
        LossTerm("tv", lambda out, field: total_variation(field.density_grid), cfg.tv_weight),
        LossTerm("tv_albedo", lambda out, field: total_variation(field.albedo_grid), cfg.tv_albedo_weight),
    ]
    return [t for t in terms if t.scale != 0]
