"""Score Distillation Sampling as pure functions of tensors.

DreamFusion: ``grad_theta = E_t,eps[ w(t) (eps_hat(z_t; y, t) - eps) dx/dtheta ]`` with
classifier-free guidance ``eps_hat = (1 + w) eps(z_t; y) - w eps(z_t; {})`` and no
backpropagation through the diffusion model (its Jacobian is dropped).
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("sds", "uniform")


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """DreamFusion's form: (1 + w) eps_c - w eps_u (diffusers' scale s equals w + 1)."""
    return (1.0 + weight) * eps_cond - weight * eps_uncond


def camera_guidance(eps_hat: torch.Tensor, eps_cond: torch.Tensor, eps_no_camera: torch.Tensor, weight: float) -> torch.Tensor:
    """A second guidance term for a camera-aware prior: ``eps_hat + w_c (eps(y, c) - eps(y, {}))``,
    the text kept and the render conditions c dropped in the third branch, so what the camera adds
    to the prediction is amplified by w_c (as InstructPix2Pix guides on its two conditions)."""
    return eps_hat + weight * (eps_cond - eps_no_camera)


def timestep_weight(alphas_cumprod_t: torch.Tensor, kind: str = "sds") -> torch.Tensor:
    """w(t): ``sds`` is sigma_t^2 = 1 - alpha_bar_t (DreamFusion's choice), ``uniform`` is 1."""
    if kind == "sds":
        return 1.0 - alphas_cumprod_t
    if kind == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    raise ValueError(f"unknown weighting {kind!r}; expected one of {', '.join(WEIGHTINGS)}")


def sds_gradient(eps_hat: torch.Tensor, eps: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_hat - eps), with ``weight_t`` (B,) broadcast over the image dims."""
    return weight_t.view(-1, *([1] * (eps.dim() - 1))) * (eps_hat - eps)


def sds_surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to ``x`` is exactly ``grad``, and whose value is that
    of 0.5 * ||x - stopgrad(x - grad)||^2 = 0.5 ||grad||^2. Written as a linear term rather than
    that square so the gradient does not lose precision to the size of ``x``."""
    grad = grad.detach()
    return (x * grad).sum() - (x.detach() * grad).sum() + 0.5 * (grad**2).sum()


def noise_images(x: torch.Tensor, eps: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """z_t = alpha_t x + sigma_t eps with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)."""
    a = alphas_cumprod_t.view(-1, *([1] * (x.dim() - 1)))
    return a.sqrt() * x + (1 - a).sqrt() * eps


def timestep_bounds(step: int, total_steps: int, t_min: float, t_max: float, t_max_end: float | None,
                    t_min_start: float | None = None) -> tuple[float, float]:
    """The [t_min, t_max] fraction range at a step (DreamFusion draws t ~ U(0.02, 0.98)): ``t_max``
    anneals linearly to ``t_max_end`` over the run when given, and the lower bound falls linearly
    from ``t_min_start`` to ``t_min`` when given (high timesteps first). The upper bound never
    falls below the lower."""
    frac = 0.0 if total_steps <= 1 else min(max(step / (total_steps - 1), 0.0), 1.0)
    hi = t_max if t_max_end is None or total_steps <= 1 else t_max + (t_max_end - t_max) * frac
    lo = t_min if t_min_start is None or total_steps <= 1 else t_min_start + (t_min - t_min_start) * frac
    return lo, max(lo, hi)
