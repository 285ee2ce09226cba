"""Guidance from the embedded prior shipped in ``assets/prior``: a small pixel-space diffusion
model of the procedural world, conditioned on MiniLM sentence-encoder states. Runs offline."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..prior.model import ASSET_DIR, TextCondition, TextEncoder, load_unet, predict_noise
from .base import Guidance, GuidanceConfig, GuidanceError


class EmbeddedGuidance(Guidance):
    name = "embedded"

    def __init__(self, cfg: GuidanceConfig, device="cpu"):
        super().__init__(cfg, device)
        folder = Path(cfg.model) if cfg.model else ASSET_DIR
        try:
            self.unet, self.prior_cfg = load_unet(folder, device)
        except FileNotFoundError as exc:
            raise GuidanceError(f"embedded prior not found: {exc}") from None
        self.encoder = TextEncoder(self.prior_cfg.max_tokens, device)
        self.max_tokens = self.prior_cfg.max_tokens
        self.alphas_cumprod = self.prior_cfg.scheduler().alphas_cumprod.to(self.device)
        self.image_size = self.prior_cfg.image_size

    def encode(self, texts: list[str]) -> TextCondition:
        return self.encoder.condition(texts)

    def concat(self, conds: list[TextCondition]) -> TextCondition:
        return TextCondition.cat(conds)

    def truncation_note(self, text: str) -> str | None:
        return self.encoder.truncation_note(text)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> (B, 3, S, S) in [-1, 1], area-averaged (antialiased)
        down to the prior's size, as its training renders were."""
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="area" if images.shape[-1] > self.image_size else "bilinear")
        return images * 2 - 1

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return predict_noise(self.unet, x_t, t, cond)
