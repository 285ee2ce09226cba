"""Does the prior follow text? A diffusion classifier: rank candidate captions of an image by
the prior's denoising error (lower is a better match), with shared noise and timesteps."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..cameras import CameraConfig
from .data import render_batch
from .model import PriorConfig, TextCondition, TextEncoder, predict_noise
from .world import COLOUR_NAMES, FIXED_COMPOSITES, NOUNS, caption, phrase


@torch.no_grad()
def denoising_errors(unet, cfg: PriorConfig, encoder: TextEncoder, image: torch.Tensor, captions: list[str],
                     timesteps: list[int], seed: int = 0) -> torch.Tensor:
    """Mean squared noise-prediction error of one image (3, S, S) in [0, 1] under each caption:
    (len(captions),). The same noise and timesteps for every caption."""
    g = torch.Generator().manual_seed(seed)
    x0 = image * 2 - 1
    alphas = cfg.scheduler().alphas_cumprod
    t = torch.tensor(timesteps)
    eps = torch.randn(len(timesteps), *x0.shape, generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # (T, 3, S, S)
    cond = encoder.condition(captions)
    errors = []
    for i in range(len(captions)):
        c = TextCondition(cond.states[i:i + 1].expand(len(timesteps), -1, -1), cond.mask[i:i + 1].expand(len(timesteps), -1),
                          cond.pooled[i:i + 1].expand(len(timesteps), -1))
        errors.append(((predict_noise(unet, x_t, t, c) - eps) ** 2).mean())
    return torch.stack(errors)


@dataclass
class ClassifierReport:
    noun_accuracy: float
    colour_accuracy: float
    held_out_noun_accuracy: float
    held_out_colour_accuracy: float
    n_images: int
    n_colour_images: int


def text_following(unet, cfg: PriorConfig, encoder: TextEncoder, n_images: int = 24, held_out: int = 8, seed: int = 0,
                   timesteps: tuple[int, ...] = (100, 250, 400, 550, 700)) -> ClassifierReport:
    """Render fresh images (``held_out`` of them of held-out pairs), and check that the caption
    with the true noun (among all 16, true colour kept) and the true colour (among all 12, true
    noun kept) has the lowest denoising error."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = render_batch(n_images, cfg.image_size, rng, gen, CameraConfig())
    images, nouns, colours = list(batch.images), list(batch.nouns), list(batch.colours)
    # replace the first ``held_out`` examples by held-out pairs rendered from the same cameras
    from ..cameras import Cameras, Lights, sample_lights
    from .data import render_object
    from .world import HELD_OUT_PAIRS, build_object

    lights = sample_lights(CameraConfig(), batch.cameras, gen)
    for i in range(held_out):
        colour, noun = HELD_OUT_PAIRS[(i * 5 + seed) % len(HELD_OUT_PAIRS)]
        cam = Cameras(*(v[i:i + 1] for v in (batch.cameras.c2w, batch.cameras.focal, batch.cameras.azimuth, batch.cameras.elevation, batch.cameras.distance)))
        light = Lights(lights.position[i:i + 1], lights.intensity[i:i + 1], lights.ambient[i:i + 1])
        images[i] = render_object(build_object(noun, colour), cam, light, ["lit"], cfg.image_size)[0]
        nouns[i], colours[i] = noun, colour
        batch.modes[i] = "lit"
    noun_hits, colour_hits, colour_n = [], [], 0
    for i, img in enumerate(images):
        az, el = float(batch.cameras.azimuth[i]), float(batch.cameras.elevation[i])
        colour = colours[i] if batch.modes[i] != "textureless" else None
        cand_nouns = [n for n in NOUNS if colour is None or n not in FIXED_COMPOSITES]
        noun_caps = [caption(phrase(n, colour, "a {colour} {noun}" if colour and n not in FIXED_COMPOSITES else "a {noun}"), az, el) for n in cand_nouns]
        err = denoising_errors(unet, cfg, encoder, img, noun_caps, list(timesteps), seed + i)
        noun_hits.append(cand_nouns[int(err.argmin())] == nouns[i])
        if colour is not None and nouns[i] not in FIXED_COMPOSITES:
            col_caps = [caption(phrase(nouns[i], c, "a {colour} {noun}"), az, el) for c in COLOUR_NAMES]
            err = denoising_errors(unet, cfg, encoder, img, col_caps, list(timesteps), seed + i)
            colour_hits.append((COLOUR_NAMES[int(err.argmin())] == colour, i < held_out))
            colour_n += 1
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return ClassifierReport(
        noun_accuracy=mean(noun_hits), colour_accuracy=mean([h for h, _ in colour_hits]),
        held_out_noun_accuracy=mean(noun_hits[:held_out]), held_out_colour_accuracy=mean([h for h, ho in colour_hits if ho]),
        n_images=len(images), n_colour_images=colour_n)
