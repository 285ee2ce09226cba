"""Drawing images from the embedded prior (DDIM with classifier-free guidance)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ..sds import classifier_free_guidance
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
    guided = guidance_scale != 1.0  # at s = 1 the unconditional branch cancels out, so it is not run
    if guided:
        cond = TextCondition.cat([cond, encoder.condition([""]).to(device).expand(len(prompts))])
        conditions = None if conditions is None else conditions.repeat(2)
    conditions = None if conditions is None else conditions.to(device)
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if guided else x
        eps = predict_noise(unet, x_in, torch.full((x_in.shape[0],), int(t), device=device), cond, conditions)
        if guided:
            eps = classifier_free_guidance(*eps.chunk(2), guidance_scale - 1)  # diffusers' s is w + 1
        x = sched.step(eps, t, x).prev_sample
    return (x.clamp(-1, 1) + 1) / 2


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, 3, H, W) -> (3, rows*H, cols*W)."""
    b, c, h, w = images.shape
    cols = (b + rows - 1) // rows
    pad = torch.ones(rows * cols - b, c, h, w, dtype=images.dtype)
    x = torch.cat([images, pad]).reshape(rows, cols, c, h, w)
    return x.permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
