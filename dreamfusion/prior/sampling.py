"""Drawing images from the embedded prior (DDIM with classifier-free guidance)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .model import PriorConfig, RenderConditions, TextCondition, TextEncoder, predict_noise


@torch.no_grad()
def sample_images(unet: UNet2DConditionModel, cfg: PriorConfig, encoder: TextEncoder, prompts: list[str], seeds: list[int],
                  guidance_scale: float = 3.0, steps: int = 40,
                  conditions: RenderConditions | None = None) -> torch.Tensor:
    """One image per (prompt, seed) pair, zipped. Returns (B, C, S, S) in [0, 1] (C = the prior's
    channels: RGB, then coverage for a 4-channel prior).

    ``guidance_scale`` is diffusers' s (eps_u + s (eps_c - eps_u)), i.e. DreamFusion's w + 1.
    ``conditions``: render conditions of a camera-aware prior (one row per image), kept in both branches of
    guidance (None: unknown)."""
    device = next(unet.parameters()).device
    sched = DDIMScheduler.from_config(cfg.scheduler().config)
    sched.set_timesteps(steps)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    x = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    cond = encoder.condition(prompts).to(device)
    uncond = encoder.condition([""]).to(device).expand(len(prompts))
    both = TextCondition.cat([cond, uncond])
    both_conditions = None if conditions is None else conditions.repeat(2).to(device)
    for t in sched.timesteps:
        tt = torch.full((2 * len(prompts),), int(t), device=device)
        eps_c, eps_u = predict_noise(unet, torch.cat([x, x]), tt, both, both_conditions).chunk(2)
        x = sched.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    return (x.clamp(-1, 1) + 1) / 2


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, 3, H, W) -> (3, rows*H, cols*W)."""
    b, c, h, w = images.shape
    cols = (b + rows - 1) // rows
    pad = torch.ones(rows * cols - b, c, h, w, dtype=images.dtype)
    x = torch.cat([images, pad]).reshape(rows, cols, c, h, w)
    return x.permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
