"""What the prior learned, by diffusion classifiers: rank candidate conditions of an image by the
prior's denoising error (lower is a better match), with shared noise and timesteps.

- :func:`text_following`: the true noun among all 16 (colour kept) and the true colour among all
  12 (noun kept), held-out pairs included; with ``paraphrase=True`` every candidate is worded in
  words and templates the prior never trained on (:data:`PARAPHRASE_NOUNS`,
  :data:`PARAPHRASE_COLOURS`, :data:`PARAPHRASE_TEMPLATES`), on the same renders.
- :func:`camera_following`: for renders of the asymmetric objects, the true azimuth among 8
  azimuths 45 degrees apart (the candidate's whole render condition: camera features and view
  label), for a camera-aware prior.
- :func:`condition_use`: how much the render conditions lower a camera-aware prior's denoising
  loss on fresh training renders, against the same renders told other cameras or none: a cheap
  per-checkpoint sign of whether the conditions are used at all.
- :func:`guided_colour`: the colour of the prior's guided estimate of a true render at each
  classifier-free guidance weight against the true colour (what SDS pulls the albedo towards).
- :func:`condition_weights`: how strongly the U-Net's first layers read each kind of render
  condition (weight norms, no images): where the classifiers say a condition goes unused, this
  says whether its inputs ever got weight.

Images are rendered from the distribution the prior was trained on (its own camera config) and
with its channels (RGB, plus coverage for a 4-channel prior).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from ..cameras import RENDER_CONDITION_GROUPS, Cameras, Lights, default_light, make_cameras, sample_backgrounds, sample_cameras, sample_lights
from ..config import CameraConfig
from ..sds import classifier_free_guidance, noise_images
from .data import render_batch, render_object
from .model import PriorConfig, RenderConditions, TextCondition, TextEncoder, predict_noise
from .world import ASYMMETRIC_NOUNS, COLOUR_NAMES, FIXED_COMPOSITES, HELD_OUT_PAIRS, NOUNS, all_objects, build_object, caption, phrase

TIMESTEPS = (100, 250, 400, 550, 700)

# Paraphrase robustness: how people might name the world's objects and colours, in words and
# templates that no training caption uses (``world.NOUN_WORDS``, ``COLOUR_WORDS``, ``MATERIAL_WORDS``
# and the phrase templates are the training side; tests/test_prior.py checks the two never meet).
# Written once, never trained on: a word moved from here into training would make the measure a lie.
PARAPHRASE_NOUNS: dict[str, str] = {
    "cube": "cuboid", "sphere": "globe", "cylinder": "column", "cone": "traffic cone", "torus": "doughnut",
    "capsule": "tablet", "pyramid": "egyptian pyramid", "mug": "teacup", "mushroom": "fungus", "table": "desk",
    "chair": "seat", "house": "cabin", "dumbbell": "barbell", "snowman": "snow figure", "tree": "christmas tree",
    "hamburger": "cheeseburger",
}
PARAPHRASE_COLOURS: dict[str, str] = {
    "red": "ruby", "green": "lime green", "blue": "navy blue", "yellow": "canary yellow", "orange": "tangerine",
    "purple": "deep purple", "pink": "hot pink", "white": "ivory", "black": "ebony", "gray": "slate grey",
    "brown": "chestnut", "cyan": "aqua",
}
#: (with a colour, without); the i-th image of a classifier run uses template i mod 5
PARAPHRASE_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a {noun} in {colour}", "a lone {noun}"),
    ("{colour} {noun}", "{noun}"),
    ("a picture of a {colour} {noun}", "a picture of a {noun}"),
    ("one {colour} {noun} by itself", "one {noun} by itself"),
    ("a {colour}-coloured {noun}", "a toy {noun}"),
)


def candidate_phrase(noun: str, colour: str | None, index: int, paraphrase: bool) -> str:
    """The phrase a classifier scores for one candidate (``index``: the image's number, which picks
    the paraphrase template): the world's own words in its plainest template, or a paraphrase."""
    if not paraphrase:
        return phrase(noun, colour, "a {colour} {noun}" if colour else "a {noun}")
    coloured, plain = PARAPHRASE_TEMPLATES[index % len(PARAPHRASE_TEMPLATES)]
    if colour is None:
        return phrase(PARAPHRASE_NOUNS[noun], None, plain)
    return phrase(PARAPHRASE_NOUNS[noun], PARAPHRASE_COLOURS[colour], coloured)


@torch.no_grad()
def denoising_errors(unet: UNet2DConditionModel, cfg: PriorConfig, encoder: TextEncoder, image: torch.Tensor, captions: list[str],
                     timesteps: list[int], seed: int = 0, conditions: RenderConditions | None = None, noises: int = 1) -> torch.Tensor:
    """Mean squared noise-prediction error of one image (C, S, S) in [0, 1] under each candidate:
    (len(captions),). ``conditions``: None, or render conditions of one row shared by every
    caption, or of one row per candidate. The same noise and timesteps for every candidate;
    ``noises``: draws of noise per timestep (the error is a Monte Carlo estimate: more draws, less
    of its variance; with 1 the draws are those of earlier versions, seed for seed)."""
    g = torch.Generator().manual_seed(seed)
    x0 = image * 2 - 1
    alphas = cfg.scheduler().alphas_cumprod
    timesteps = list(timesteps) * noises
    t = torch.tensor(timesteps)
    eps = torch.randn(len(timesteps), *x0.shape, generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # (T, C, S, S)
    cond = encoder.condition(captions)
    errors = []
    for i in range(len(captions)):
        c = TextCondition(cond.states[i:i + 1].expand(len(timesteps), -1, -1), cond.mask[i:i + 1].expand(len(timesteps), -1),
                          cond.pooled[i:i + 1].expand(len(timesteps), -1))
        rc = None
        if conditions is not None:
            k = slice(0, 1) if _rows(conditions) == 1 else slice(i, i + 1)
            rc = RenderConditions(*(None if v is None else v[k] for v in (conditions.features, conditions.rays))).repeat(len(timesteps))
        errors.append(((predict_noise(unet, x_t, t, c, rc) - eps) ** 2).mean())
    return torch.stack(errors)


def _rows(conditions: RenderConditions) -> int:
    return next(v.shape[0] for v in (conditions.features, conditions.rays) if v is not None)


@dataclass
class ClassifierReport:
    noun_accuracy: float
    colour_accuracy: float
    held_out_noun_accuracy: float
    held_out_colour_accuracy: float
    n_images: int
    n_colour_images: int


def _conditions(cfg: PriorConfig, cams: Cameras, lights: Lights, modes: list[str]) -> RenderConditions | None:
    return RenderConditions.of(cfg, cams, lights, modes) if cfg.condition_features or cfg.ray_channels else None


def text_following(unet: UNet2DConditionModel, cfg: PriorConfig, encoder: TextEncoder, n_images: int = 24, held_out: int = 8, seed: int = 0,
                   timesteps: tuple[int, ...] = TIMESTEPS, paraphrase: bool = False) -> ClassifierReport:
    """Render fresh images (``held_out`` of them of held-out pairs), and check that the caption
    with the true noun (among all 16, true colour kept) and the true colour (among all 12, true
    noun kept) has the lowest denoising error. ``paraphrase``: word every candidate as
    :func:`candidate_phrase` paraphrases it (the same renders, noise and timesteps for a given seed)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    camera_cfg = cfg.camera_config()
    with_alpha = cfg.channels == 4
    batch = render_batch(n_images, cfg.image_size, rng, gen, camera_cfg, with_alpha=with_alpha)
    images, nouns, colours = list(batch.images), list(batch.nouns), list(batch.colours)
    # replace the first ``held_out`` examples by held-out pairs rendered from the same cameras
    lights = sample_lights(camera_cfg, batch.cameras, gen)
    for i in range(held_out):
        colour, noun = HELD_OUT_PAIRS[(i * 5 + seed) % len(HELD_OUT_PAIRS)]
        images[i] = render_object(build_object(noun, colour), batch.cameras[i], lights[i], ["lit"], cfg.image_size, with_alpha=with_alpha)[0]
        nouns[i], colours[i] = noun, colour
        batch.modes[i] = "lit"
        batch.lights.position[i], batch.lights.intensity[i], batch.lights.ambient[i] = lights.position[i], lights.intensity[i], lights.ambient[i]
    noun_hits, colour_hits, colour_n = [], [], 0
    for i, img in enumerate(images):
        az, el = float(batch.cameras.azimuth[i]), float(batch.cameras.elevation[i])
        feats = _conditions(cfg, batch.cameras[i], batch.lights[i], [batch.modes[i]])
        colour = colours[i] if batch.modes[i] != "textureless" else None
        cand_nouns = [n for n in NOUNS if colour is None or n not in FIXED_COMPOSITES]
        noun_caps = [caption(candidate_phrase(n, None if n in FIXED_COMPOSITES else colour, i, paraphrase), az, el) for n in cand_nouns]
        err = denoising_errors(unet, cfg, encoder, img, noun_caps, list(timesteps), seed + i, feats)
        noun_hits.append(cand_nouns[int(err.argmin())] == nouns[i])
        if colour is not None and nouns[i] not in FIXED_COMPOSITES:
            col_caps = [caption(candidate_phrase(nouns[i], c, i, paraphrase), az, el) for c in COLOUR_NAMES]
            err = denoising_errors(unet, cfg, encoder, img, col_caps, list(timesteps), seed + i, feats)
            colour_hits.append((COLOUR_NAMES[int(err.argmin())] == colour, i < held_out))
            colour_n += 1

    def mean(xs: list) -> float:
        return sum(xs) / max(len(xs), 1)

    return ClassifierReport(
        noun_accuracy=mean(noun_hits), colour_accuracy=mean([h for h, _ in colour_hits]),
        held_out_noun_accuracy=mean(noun_hits[:held_out]), held_out_colour_accuracy=mean([h for h, ho in colour_hits if ho]),
        n_images=len(images), n_colour_images=colour_n)


@dataclass
class CameraReport:
    top1: float
    within_45: float
    """the best candidate is the true azimuth or one of its two neighbours"""
    per_noun: dict[str, float]
    n_images: int


def camera_following(unet: UNet2DConditionModel, cfg: PriorConfig, encoder: TextEncoder, nouns: tuple[str, ...] = ASYMMETRIC_NOUNS, views: int = 8,
                     elevations: tuple[float, ...] = (10.0, 35.0), seed: int = 0, timesteps: tuple[int, ...] = TIMESTEPS,
                     noises: int = 1) -> CameraReport:
    """For each noun, render it at ``views`` azimuths 45 degrees apart (each elevation, lit, light
    at the camera) and rank the 8 candidate azimuths by the prior's denoising error under each
    candidate's render conditions and view label: the true azimuth should win (chance 1/8).
    ``noises``: noise draws per timestep (see :func:`denoising_errors`)."""
    if not cfg.condition_features and not cfg.ray_channels:
        raise ValueError("this prior takes no render conditions: it cannot tell cameras apart beyond its view labels")
    camera_cfg = cfg.camera_config()
    distance = sum(camera_cfg.distance_range) / 2
    zoom = camera_cfg.zoom_range
    focal = distance * sum(zoom) / 2 if zoom is not None else sum(camera_cfg.focal_range) / 2
    azimuths = torch.arange(views, dtype=torch.float32) * (360.0 / views)
    hits, near, per = [], [], {}
    for noun in nouns:
        colour = None if noun in FIXED_COMPOSITES else {"mug": "white", "chair": "brown", "house": "white"}.get(noun)
        obj = build_object(noun, colour)
        text = phrase(noun, colour, "a {colour} {noun}" if colour else "a {noun}")
        noun_hits = []
        for el in elevations:
            cams = make_cameras(azimuths, el, distance, focal)
            lights = default_light(cams, intensity=0.7, ambient=0.15)
            images = render_object(obj, cams, lights, ["lit"] * views, cfg.image_size, with_alpha=cfg.channels == 4)
            feats = RenderConditions.of(cfg, cams, lights, ["lit"] * views)
            caps = [caption(text, float(a), el) for a in azimuths]
            for i in range(views):
                err = denoising_errors(unet, cfg, encoder, images[i], caps, list(timesteps), seed + i, feats, noises)
                best = int(err.argmin())
                noun_hits.append(best == i)
                near.append(min((best - i) % views, (i - best) % views) <= 1)
        per[noun] = sum(noun_hits) / len(noun_hits)
        hits += noun_hits
    return CameraReport(top1=sum(hits) / len(hits), within_45=sum(near) / len(near), per_noun=per, n_images=len(hits))


@dataclass
class Coverage:
    noun: str
    minimum: float
    median: float
    maximum: float
    touching_edge: float
    """fraction of views in which the object reaches the image's outermost pixels"""


def frame_coverage(camera_cfg: CameraConfig, n: int = 128, size: int = 32, seed: int = 0) -> list[Coverage]:
    """How much of the image each object of the world fills under a camera distribution: the
    fraction of pixels its coverage mask holds, over ``n`` random cameras (the same for all)."""
    cams = sample_cameras(camera_cfg, n, torch.Generator().manual_seed(seed))
    lights = default_light(cams)
    out = []
    for obj in all_objects():
        alpha = render_object(obj, cams, lights, ["albedo"] * n, size, with_alpha=True)[:, 3]
        frac = alpha.mean(dim=(1, 2))
        border = torch.cat([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], dim=1).amax(dim=1)
        out.append(Coverage(obj.noun, float(frac.min()), float(frac.median()), float(frac.max()), float((border > 0).float().mean())))
    return out


@dataclass
class ConditionUse:
    loss: float
    """mean epsilon MSE with the true conditions"""
    gain_over_shuffled: float
    """relative loss reduction against the same renders told another render's camera (lights and modes kept)"""
    gain_over_dropped: float
    """relative loss reduction against the conditions dropped (all zeros: unknown)"""
    n_images: int


@torch.no_grad()
def condition_use(unet: UNet2DConditionModel, cfg: PriorConfig, encoder: TextEncoder, n_images: int = 128,
                  timesteps: tuple[int, ...] = (300, 600, 900), seed: int = 0, cameras: Cameras | None = None) -> ConditionUse:
    """Render ``n_images`` training examples (the prior's own distributions), noise them at each
    timestep with shared noise, and compare the denoising loss under their true render conditions
    with the loss when the cameras are shuffled among the images or the conditions dropped.
    Gains near 0 mean the prior ignores the conditions. ``cameras``: render from these instead of
    random ones (for tests)."""
    if not cfg.condition_features and not cfg.ray_channels:
        raise ValueError("this prior takes no render conditions")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    batch = render_batch(n_images, cfg.image_size, rng, gen, cfg.camera_config(), with_alpha=cfg.channels == 4,
                         random_background=cfg.random_background, cameras=cameras)
    cams = batch.cameras
    x0 = batch.images * 2 - 1
    cond = encoder.condition(batch.captions)
    perm = torch.roll(torch.arange(n_images), 1)  # every image gets another's camera
    variants = {
        "true": RenderConditions.of(cfg, cams, batch.lights, batch.modes),
        "shuffled": RenderConditions.of(cfg, cams[perm], batch.lights, batch.modes),
        "dropped": RenderConditions.of(cfg, cams, batch.lights, batch.modes, torch.zeros(n_images, dtype=torch.bool)),
    }
    alphas = cfg.scheduler().alphas_cumprod
    totals = dict.fromkeys(variants, 0.0)
    for ts in timesteps:
        t = torch.full((n_images,), ts)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = noise_images(x0, eps, alphas[t])
        for name, rc in variants.items():
            totals[name] += float(((predict_noise(unet, x_t, t, cond, rc) - eps) ** 2).mean()) / len(timesteps)
    true = totals["true"]
    return ConditionUse(loss=true, gain_over_shuffled=1 - true / totals["shuffled"], gain_over_dropped=1 - true / totals["dropped"],
                        n_images=n_images)


@dataclass
class GuidedColour:
    """Mean RGB over fully covered pixels of true renders (``truth``) and of the prior's one-step
    estimate of the clean image under classifier-free guidance weight w (``estimates[w]``)."""

    truth: tuple[float, float, float]
    estimates: dict[float, tuple[float, float, float]]

    def error(self, weight: float) -> float:
        """Mean absolute RGB difference of the estimate at ``weight`` to the truth."""
        return sum(abs(a - b) for a, b in zip(self.estimates[weight], self.truth, strict=True)) / 3


@torch.no_grad()
def guided_colour(unet: UNet2DConditionModel, cfg: PriorConfig, encoder: TextEncoder, noun: str, colour: str | None,
                  weights: tuple[float, ...] = (0.0, 3.0, 5.0, 10.0), mode: str = "lit", timestep: int = 500, n_views: int = 16,
                  seed: int = 0) -> GuidedColour:
    """Which colour SDS pulls a true render towards at each guidance weight: render the object from
    ``n_views`` cameras of the prior's distribution (shading ``mode``, the prior's backgrounds),
    noise at ``timestep``, and read the colour of x0_hat = (z_t - sigma_t eps_hat) / alpha_t,
    with eps_hat = (1 + w) eps(z_t; text) - w eps(z_t; "") as SDS forms it (view-labelled text;
    the unconditional branch keeps the render conditions). A weight whose estimate is far from
    the truth moves the albedo away from it (no clamping: the estimate is linear in w)."""
    gen = torch.Generator().manual_seed(seed)
    camera_cfg = cfg.camera_config()
    cams = sample_cameras(camera_cfg, n_views, gen)
    lights = sample_lights(camera_cfg, cams, gen)
    backgrounds = sample_backgrounds(n_views, cfg.random_background, gen) if cfg.random_background > 0 else None
    modes = [mode] * n_views
    image = render_object(build_object(noun, colour), cams, lights, modes, cfg.image_size, with_alpha=True, backgrounds=backgrounds)
    covered = image[:, 3] >= 1.0
    if not bool(covered.any()):
        raise ValueError(f"no pixel of the {noun} is fully covered in these views")
    x0 = (image if cfg.channels == 4 else image[:, :3]) * 2 - 1
    text = phrase(noun, colour, "a {colour} {noun}")
    cond = encoder.condition([caption(text, float(a), float(e)) for a, e in zip(cams.azimuth, cams.elevation, strict=True)])
    uncond = encoder.condition([""] * n_views)
    rc = _conditions(cfg, cams, lights, modes)
    t = torch.full((n_views,), timestep)
    a = cfg.scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=gen)
    z = noise_images(x0, eps, a)
    eps_c = predict_noise(unet, z, t, cond, rc)
    eps_u = predict_noise(unet, z, t, uncond, rc)

    def mean_rgb(x: torch.Tensor) -> tuple[float, float, float]:
        return tuple(float(((x[:, c] + 1) / 2)[covered].mean()) for c in range(3))

    estimates = {}
    for w in weights:
        eps_hat = classifier_free_guidance(eps_c, eps_u, w)
        estimates[float(w)] = mean_rgb((z - (1 - a).sqrt() * eps_hat) / a.sqrt())
    return GuidedColour(truth=mean_rgb(x0), estimates=estimates)


@dataclass
class ConditionWeights:
    """Mean L2 norm of the first layers' weights per input, by kind of input: ``image`` and
    ``rays`` per input channel of ``conv_in`` (over its output channels and 3 x 3 taps); ``text``
    and each of ``features`` (:data:`~dreamfusion.cameras.RENDER_CONDITION_GROUPS`) per input
    column of the class embedding's first linear layer (pooled sentence vector, then the render
    condition vector)."""

    image: float
    rays: float | None
    text: float
    features: dict[str, float]


def condition_weights(unet: UNet2DConditionModel, cfg: PriorConfig) -> ConditionWeights:
    """:class:`ConditionWeights` of a prior's U-Net, read from its weights alone. An input whose
    norm stays near its initial value (or near 0, for inputs that started at 0) has not been
    learned from; the text's columns are the yardstick of an input that has."""
    w_in = unet.conv_in.weight.detach().float()  # (out, in, 3, 3)
    per_channel = w_in.transpose(0, 1).flatten(1).norm(dim=1)
    image = float(per_channel[:cfg.channels].mean())
    rays = float(per_channel[cfg.channels:].mean()) if cfg.ray_channels else None
    if unet.class_embedding is None:
        raise ValueError("this prior has no class embedding: nothing but the text conditions it")
    cols = unet.class_embedding.linear_1.weight.detach().float().norm(dim=0)  # one norm per input column
    text = float(cols[:cfg.text_dim].mean())
    feats = cols[cfg.text_dim:]
    features = {name: float(feats[sl].mean()) for name, sl in RENDER_CONDITION_GROUPS.items()} if cfg.condition_features else {}
    return ConditionWeights(image=image, rays=rays, text=text, features=features)
