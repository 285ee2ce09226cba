"""The guidance interface: a frozen text-to-image diffusion model that grades renders.

Each step the trainer hands the guidance a :class:`RenderBatch`: the renders and how they were
made (cameras, lights, shading mode, opacity), so a prior that knows about cameras can use them
and one that does not (Stable Diffusion) ignores them. A prior implements ``encode`` (texts -> a
condition, cached by the caller), ``model_input`` (renders in [0, 1] -> what its U-Net denoises:
resized pixels or VAE latents, differentiable) and ``predict_noise``; :meth:`Guidance.sds_loss` is
shared by every prior. :meth:`Guidance.loss` is what the trainer calls: SDS, unless a guidance
(the reference) grades renders another way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cameras import Cameras, Lights
from ..config import CameraConfig, GuidanceConfig
from ..sds import camera_guidance, classifier_free_guidance, noise_images, sds_gradient, sds_surrogate_loss, timestep_weight


@dataclass
class RenderBatch:
    """Renders and the conditions they were made under. ``images`` (B, 3, H, W) in [0, 1] and
    ``opacity`` (B, 1, H, W) are differentiable; ``cameras``, ``lights`` (B of each) and ``modes``
    (B shading modes) are None when unknown (an image from elsewhere)."""

    images: torch.Tensor
    opacity: torch.Tensor | None = None
    cameras: Cameras | None = None
    lights: Lights | None = None
    modes: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def _repeat(conditions: object, n: int) -> object:
    """A batch of conditions repeated ``n`` times along its first dimension."""
    if conditions is None:
        return None
    if isinstance(conditions, torch.Tensor):
        return torch.cat([conditions] * n)
    return conditions.repeat(n)


def as_render_batch(renders: RenderBatch | torch.Tensor) -> RenderBatch:
    return renders if isinstance(renders, RenderBatch) else RenderBatch(renders)


class GuidanceError(RuntimeError):
    """A prior that cannot be loaded or used: the message is meant for the user as is."""


class Guidance:
    """Base class; subclasses set ``alphas_cumprod`` (T,) and implement the three methods."""

    name = "base"
    alphas_cumprod: torch.Tensor
    max_tokens: int = 77

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self._cache: dict[str, object] = {}

    # -- to implement
    def encode(self, texts: list[str]) -> object:
        raise NotImplementedError

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: object, features: object = None) -> torch.Tensor:
        """eps for a batch; ``cond`` is what :meth:`encode` returned for as many texts; ``features``
        what :meth:`render_features` returned (priors that take none never receive any)."""
        raise NotImplementedError

    # -- may override
    def renders_input(self, renders: RenderBatch) -> torch.Tensor:
        """What the U-Net denoises, from the whole batch (default: :meth:`model_input` of the images)."""
        return self.model_input(renders.images)

    def render_features(self, renders: RenderBatch) -> object:
        """Per-render conditions for a camera-aware prior (a tensor (B, F), or any object with a
        ``repeat(n)`` method that repeats its batch), or None (the default: text only)."""
        return None

    def backgrounds(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Solid colours (n, 3) to render the next ``n`` views on, for a prior that was trained on
        them, or None (the default): the scene's own background."""
        return None

    def check_prompt(self, prompt: str) -> None:
        """Raise :class:`GuidanceError` for a prompt this guidance cannot grade (default: any goes)."""

    def vocabulary_note(self, prompt: str) -> str | None:
        """A note for the user when ``prompt`` is far from anything this prior knows (default: None,
        a prior that knows the open world)."""
        return None

    def camera_config(self) -> CameraConfig | None:
        """The camera/light distribution this prior was trained on (a CameraConfig), or None:
        training then draws from its own config."""
        return None

    def concat(self, conds: list) -> object:
        raise NotImplementedError

    def truncation_note(self, text: str) -> str | None:
        return None

    # -- shared
    def condition(self, texts: list[str]) -> object:
        """Encoded texts, each computed once per prior."""
        for t in texts:
            if t not in self._cache:
                self._cache[t] = self.encode([t])
        return self.concat([self._cache[t] for t in texts])

    def loss(self, renders: RenderBatch, texts: list[str], t_range: tuple[float, float], generator: torch.Generator | None = None) -> dict:
        """The trainer's loss for a batch of renders: SDS (see :meth:`sds_loss`)."""
        return self.sds_loss(renders, texts, t_range, generator)

    def sds_loss(self, renders: RenderBatch | torch.Tensor, texts: list[str], t_range: tuple[float, float],
                 generator: torch.Generator | None = None) -> dict:
        """Surrogate loss whose gradient w.r.t. the model input is w(t)(eps_hat - eps) / B (the
        mean over the batch). Pass a CPU ``generator``: draws are made on the CPU, then moved.

        ``renders``: a :class:`RenderBatch` (or just its images, (B, 3, H, W) in [0, 1]),
        differentiable; one text per image. The unconditional branch of guidance drops the text
        but keeps the render conditions (as MVDream does); with ``camera_guidance_scale`` w_c > 0 a
        third branch keeps the text and drops the conditions, and w_c times what they add is added
        (:func:`~dreamfusion.sds.camera_guidance`). Returns ``loss`` (scalar), ``t`` (B,)
        and ``grad_norm``."""
        renders = as_render_batch(renders)
        x = self.renders_input(renders)
        features = self.render_features(renders)
        draws = max(1, int(getattr(self.cfg, "draws", 1)))
        if draws > 1:  # independent (t, eps) per copy; the mean over copies is the gradient
            x = x.repeat(draws, *([1] * (x.dim() - 1)))
            texts = list(texts) * draws
            features = _repeat(features, draws)
        b = x.shape[0]
        n_t = self.alphas_cumprod.shape[0]
        lo, hi = int(t_range[0] * n_t), max(int(t_range[0] * n_t) + 1, int(t_range[1] * n_t))
        t = torch.randint(lo, hi, (b,), generator=generator).to(self.device)
        eps = torch.randn(x.shape, generator=generator).to(self.device, x.dtype)
        a_t = self.alphas_cumprod.to(self.device)[t]
        with torch.no_grad():
            z_t = noise_images(x.detach(), eps, a_t)
            cond = self.concat([self.condition(texts), self.condition([""] * b)])
            both = (torch.cat([z_t, z_t]), torch.cat([t, t]), cond)
            eps = eps.float()
            out = self.predict_noise(*both) if features is None else self.predict_noise(*both, _repeat(features, 2))
            eps_c, eps_u = out.float().chunk(2)
            eps_hat = classifier_free_guidance(eps_c, eps_u, self.cfg.guidance_scale)
            w_c = float(getattr(self.cfg, "camera_guidance_scale", 0.0))
            if features is not None and w_c > 0:  # a third branch: the text without the render conditions
                eps_nc = self.predict_noise(z_t, t, self.condition(texts)).float()
                eps_hat = camera_guidance(eps_hat, eps_c, eps_nc, w_c)
            grad = sds_gradient(eps_hat, eps, timestep_weight(a_t.float(), self.cfg.weighting))
            grad = torch.nan_to_num(grad)
        return {"loss": sds_surrogate_loss(x.float(), grad) / b, "t": t, "grad_norm": float(grad.norm() / b)}
