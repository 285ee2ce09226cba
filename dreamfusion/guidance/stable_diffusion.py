"""Guidance from a Stable Diffusion 1.x/2.x checkpoint (diffusers layout): the renders are
encoded by its VAE and the latents graded by its U-Net, conditioned on CLIP text states.

``cfg.model`` is a local folder (``tokenizer/``, ``text_encoder/``, ``vae/``, ``unet/``,
``scheduler/``) or a hub id; empty means :data:`DEFAULT_MODEL`. Nothing is ever fine-tuned: every
weight is frozen and only the gradient through the VAE encoder reaches the renders. Precision and
memory on a GPU: :mod:`dreamfusion.guidance.pipeline`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import GuidanceConfig, GuidanceError
from .pipeline import HUB_TIMEOUT_S, ComponentError, DiffusersGuidance, freeze, load_component, load_pipeline

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
_ADVICE = "download it once and pass --model /path/to/folder, or use --guidance embedded (offline)"

__all__ = ["DEFAULT_MODEL", "HUB_TIMEOUT_S", "StableDiffusionGuidance"]


def _load_components(source: str, local_only: bool, dtype: torch.dtype, text_dtype: torch.dtype) -> dict:
    """tokenizer, text_encoder, vae, unet and scheduler from a diffusers-layout folder or repo."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {}
    for key, cls, kind in (("tokenizer", CLIPTokenizer, None), ("text_encoder", CLIPTextModel, text_dtype), ("vae", AutoencoderKL, dtype),
                           ("unet", UNet2DConditionModel, dtype), ("scheduler", DDPMScheduler, None)):
        if cls is DDPMScheduler or cls is CLIPTokenizer:
            try:
                parts[key] = cls.from_pretrained(source, subfolder=key, local_files_only=local_only)
            except Exception as exc:  # noqa: BLE001 - any failure becomes one GuidanceError line
                raise ComponentError(key, exc) from None
        else:
            parts[key] = load_component(cls, source, key, local_only, kind)
    return parts


class StableDiffusionGuidance(DiffusersGuidance):
    name = "stable-diffusion"
    text_encoder_name = "CLIP"

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        source = cfg.model or DEFAULT_MODEL
        parts = load_pipeline("stable-diffusion", source, lambda src, local: _load_components(src, local, self.dtype, self.text_dtype), _ADVICE)
        self.take_components(parts)
        vae = parts["vae"]
        vae.decoder = None  # SDS grades latents: the decoder is never run (about 60% of the VAE's weights)
        self.vae = freeze(vae, self.device, self.dtype)
        self.max_tokens = int(self.tokenizer.model_max_length)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = self.unet_sample_size() * self.vae_scale_factor
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))

    # -- the Guidance interface
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """CLIP's last hidden states (B, 77, D) of the full padded sequence, without a mask, as SD was trained."""
        return self.text_encoder(input_ids)[0]

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> VAE latents (B, 4, S/f, S/f), scaled as the U-Net
        expects; differentiable through the (frozen) encoder. The posterior's mean, not a draw: a
        draw would come from torch's global generator (runs would not repeat), and the VAE's
        posterior is so narrow that its mean is what SDS grades anyway."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (images * 2 - 1).to(self.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        return latents * self.scaling_factor

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """eps; a v-prediction U-Net (SD 2.x 768-v) is converted: eps = alpha_t v + sigma_t x_t."""
        x_t = x_t.to(self.dtype)
        out = self.unet(x_t, t, encoder_hidden_states=cond.to(self.dtype)).sample
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].view(-1, 1, 1, 1).to(self.device)
            out = a.sqrt() * out.float() + (1 - a).sqrt() * x_t.float()
        elif self.prediction_type != "epsilon":
            raise GuidanceError(f"stable-diffusion: unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        return out
