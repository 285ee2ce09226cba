"""The guidance interface: a frozen text-to-image diffusion model that grades renders.

A prior implements three things: ``encode`` (texts -> a condition, cached by the caller),
``model_input`` (renders in [0, 1] -> what its U-Net denoises: resized pixels or VAE latents,
differentiable) and ``predict_noise``. :meth:`Guidance.sds_loss` is shared by every prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sds import classifier_free_guidance, noise_images, sds_gradient, sds_surrogate_loss, timestep_weight


class GuidanceError(RuntimeError):
    """A prior that cannot be loaded or used: the message is meant for the user as is."""


@dataclass
class GuidanceConfig:
    """Score Distillation Sampling."""

    name: str = "embedded"
    """which prior: embedded (shipped, offline) or stable-diffusion"""
    model: str = ""
    """stable-diffusion: a local folder or a hub id; embedded: a folder other than assets/prior"""
    guidance_scale: float = 10.0
    """classifier-free guidance weight w (DreamFusion: 100 with Imagen; the embedded prior's
    weaker unconditional branch does best near 10)"""
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_end: float | None = 0.5
    """anneal t_max linearly to this over the run (None: no annealing)"""
    weighting: str = "sds"
    half_precision: bool = False
    """fp16 weights on CUDA (stable-diffusion)"""


class Guidance:
    """Base class; subclasses set ``alphas_cumprod`` (T,) and implement the three methods."""

    name = "base"
    alphas_cumprod: torch.Tensor
    max_tokens: int = 77

    def __init__(self, cfg: GuidanceConfig, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self._cache: dict[str, object] = {}

    # -- to implement
    def encode(self, texts: list[str]):
        raise NotImplementedError

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """eps for a batch; ``cond`` is what :meth:`encode` returned for as many texts."""
        raise NotImplementedError

    def concat(self, conds: list):
        raise NotImplementedError

    def truncation_note(self, text: str) -> str | None:
        return None

    # -- shared
    def condition(self, texts: list[str]):
        """Encoded texts, each computed once per prior."""
        for t in texts:
            if t not in self._cache:
                self._cache[t] = self.encode([t])
        return self.concat([self._cache[t] for t in texts])

    def sds_loss(self, images: torch.Tensor, texts: list[str], t_range: tuple[float, float], generator: torch.Generator | None = None) -> dict:
        """Surrogate loss whose gradient w.r.t. the model input is w(t)(eps_hat - eps) / B (the
        mean over the batch). Pass a CPU ``generator``: draws are made on the CPU, then moved.

        ``images`` (B, 3, H, W) in [0, 1], differentiable; one text per image. Returns ``loss``
        (scalar), ``t`` (B,) and ``grad_norm``."""
        x = self.model_input(images)
        b = x.shape[0]
        n_t = self.alphas_cumprod.shape[0]
        lo, hi = int(t_range[0] * n_t), max(int(t_range[0] * n_t) + 1, int(t_range[1] * n_t))
        t = torch.randint(lo, hi, (b,), generator=generator).to(self.device)
        eps = torch.randn(x.shape, generator=generator).to(self.device, x.dtype)
        a_t = self.alphas_cumprod.to(self.device)[t]
        with torch.no_grad():
            z_t = noise_images(x.detach(), eps, a_t)
            cond = self.concat([self.condition(texts), self.condition([""] * b)])
            eps_c, eps_u = self.predict_noise(torch.cat([z_t, z_t]), torch.cat([t, t]), cond).float().chunk(2)
            eps_hat = classifier_free_guidance(eps_c, eps_u, self.cfg.guidance_scale)
            grad = sds_gradient(eps_hat, eps.float(), timestep_weight(a_t.float(), self.cfg.weighting))
            grad = torch.nan_to_num(grad)
        return {"loss": sds_surrogate_loss(x.float(), grad) / b, "t": t, "grad_norm": float(grad.norm() / b)}
