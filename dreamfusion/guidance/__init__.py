"""Priors that grade renders through Score Distillation Sampling, by name."""

from __future__ import annotations

from .base import Guidance, GuidanceConfig, GuidanceError

GUIDANCE_NAMES = ("embedded", "stable-diffusion")


def load_guidance(cfg: GuidanceConfig, device="cpu") -> Guidance:
    """Build the prior named by ``cfg.name``; a :class:`GuidanceError` says what went wrong."""
    if cfg.name == "embedded":
        from .embedded import EmbeddedGuidance

        return EmbeddedGuidance(cfg, device)
    if cfg.name == "stable-diffusion":
        from .stable_diffusion import StableDiffusionGuidance

        return StableDiffusionGuidance(cfg, device)
    raise GuidanceError(f"unknown guidance {cfg.name!r}; valid names: {', '.join(GUIDANCE_NAMES)}")


__all__ = ["GUIDANCE_NAMES", "Guidance", "GuidanceConfig", "GuidanceError", "load_guidance"]
