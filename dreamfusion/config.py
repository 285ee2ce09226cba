"""Every typed setting of the project, in one torch-free module.

The command line (tyro) builds its ``--help`` from these dataclasses, the app and the benchmarks
change them with :func:`dataclasses.replace`, and a run saves them as JSON. Nothing here imports
torch, so ``dreamfusion --help`` is instant; the modules that use a config import it from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "prior"
"""the shipped embedded prior (a snapshot of a training run: weights, config, vocabulary, samples)"""
TRAINING_PRIOR_DIR = ASSET_DIR.parent / "prior_v2"
"""the prior in training: its resume state, what ``train-prior`` continues by default"""
MAX_RENDER_SIZE = 512


# ----------------------------------------------------------------------------- cameras


@dataclass(frozen=True)
class CameraConfig:
    """Ranges of the random camera and light (degrees and world units)."""

    elevation_range: tuple[float, float] = (-30.0, 90.0)
    """below the horizon too: the world's objects float, and their undersides must be seen to be carved"""
    azimuth_range: tuple[float, float] = (0.0, 360.0)
    distance_range: tuple[float, float] = (1.8, 2.0)
    focal_range: tuple[float, float] = (1.15, 1.4)
    """focal length as a multiple of the image width (used when ``zoom_range`` is None)"""
    zoom_range: tuple[float, float] | None = (0.64, 0.70)
    """focal length / distance, drawn instead of the focal length: the framing stays tight whatever
    the distance (which then only sets the perspective). 0.70 is the tightest under which every object
    of the world stays inside the frame from every direction (the pyramid's corners touch the edge at
    0.72); docs/prior.md has the coverage per object"""
    light_jitter: float = 0.6
    """point light: the camera position plus Gaussian jitter of this std (world units)"""
    light_intensity_range: tuple[float, float] = (0.55, 0.8)
    ambient_range: tuple[float, float] = (0.1, 0.2)
    """intensity + ambient never exceeds 1, so a lit render never leaves [0, 1]: the prior is only
    shown values its training images could hold"""


#: the distribution the first embedded prior (v1) was trained on: wider framing, elevation from -10,
#: light + ambient up to 1.2. For comparisons with that prior.
LEGACY_CAMERA = CameraConfig(elevation_range=(-10.0, 90.0), distance_range=(1.6, 2.1), focal_range=(0.95, 1.25), zoom_range=None,
                             light_intensity_range=(0.6, 0.9), ambient_range=(0.1, 0.3))


#: probabilities of the lit, textureless and albedo shading modes: the prior's training renders
#: and SDS training draw from the same
SHADING_PROBS = (0.6, 0.2, 0.2)


# ----------------------------------------------------------------------------- scene


@dataclass
class FieldConfig:
    """The density/albedo grid and its initial blob."""

    resolution: int = 64
    """voxels per side of the density/albedo grid"""
    bound: float = 0.75
    """the scene is [-bound, bound]^3: every object of the world fits once centred (a voxel of 0.024)"""
    blob_density: float = 5.0
    """lambda of the initial density bias lambda * (1 - |x| / c); the paper's 5 / 0.2: a blob that
    does not stay in the way (20 / 0.5 left the torus's hole filled)"""
    blob_radius: float = 0.2
    """c of the density bias (world units)"""
    blob_fade_steps: int = 600
    """the blob's inside fades to nothing over this many steps from the start (its outside, which
    keeps empty space empty, stays): the blob starts the object, then gets out of the way so holes
    can open (0: it stays). Counted in steps, not as a fraction of the run, so a short run keeps
    its blob instead of ending with nothing to export"""
    density_activation: str = "exp"
    """exp (truncated) or softplus of the interpolated raw density plus the blob: with exp a few
    units of raw density separate empty from opaque, so surfaces can be sharp and holes carved"""
    density_shift: float = 0.0
    """added to the raw density before the activation (negative: the scene starts nearly empty outside the blob)"""
    background: str = "white"
    """white or black (fixed, as the embedded prior was trained), or mlp (learned from the ray direction, as in the paper)"""
    coarse_resolutions: tuple[int, ...] = ()
    """coarse-to-fine: the grid starts at the first of these and moves through the others to
    ``resolution``, at evenly spaced points of the first ``coarse_fraction`` of the run (empty: no growth)"""
    coarse_fraction: float = 0.3


@dataclass
class RenderConfig:
    """Ray marching and the occupancy grid."""

    samples_per_ray: int = 96
    """march step = box diagonal / this"""
    occupancy_resolution: int = 32
    occupancy_threshold: float = 0.01
    """a cell is occupied when density x step exceeds this (nerfacc's occ_thre)"""
    occupancy_update_every: int = 8
    occupancy_warmup: int = 64
    sampler: str = "auto"
    """auto (nerfacc's CUDA kernel where available, else the PyTorch sampler), torch, or dense"""


# ----------------------------------------------------------------------------- guidance


@dataclass
class GuidanceConfig:
    """The prior that grades renders (Score Distillation Sampling)."""

    name: str = "embedded"
    """which prior: embedded (shipped, offline), stable-diffusion or deepfloyd-if"""
    model: str = ""
    """stable-diffusion, deepfloyd-if: a local folder or a hub id; embedded: a folder other than assets/prior"""
    guidance_scale: float | None = None
    """classifier-free guidance weight w (None: the prior's own default, see dreamfusion.guidance.GUIDANCES)"""
    t_min: float = 0.02
    """the timestep range's lower bound, as a fraction of the schedule. The four timestep settings
    left at their defaults here take the prior's own where its registry entry gives them
    (deepfloyd-if: the peers' U(0.02, 0.98) throughout)"""
    t_max: float = 0.98
    t_max_end: float | None = 0.8
    """anneal t_max linearly to this over the run (None: no annealing, the paper's U(t_min, t_max)
    throughout). 0.8 since 2026-11-25 (fourth sitting): the run keeps its highest timesteps for
    most of its length (a dumbbell's two balls need them) and ends without those above 0.8; on the
    whole list colour error fell 0.088 -> 0.071 (lower on all 15 prompts) and mean IoU rose 0.798
    -> 0.814 against None. Annealing to 0.5, the default before None, kept the dumbbell one ball
    (docs/ablations.md)"""
    t_min_start: float | None = 0.7
    """start the run with the lower bound at this and lower it linearly to t_min over the run (None:
    t_min throughout): high timesteps first, as DreamTime argues. Left out early, the low timesteps
    cannot erase a part that is still faint. 0.7 since 2026-12-03: the chair gets its backrest (a
    hit from seeds 0 and 1, a table at None), and on the whole list mean IoU 0.814 -> 0.823, colour
    error 0.071 -> 0.072, R-Precision 93% either way (docs/ablations.md)"""
    weighting: str = "sds"
    draws: int = 1
    """independent (t, eps) draws per render, their gradients averaged: lower-variance SDS at the
    cost of a larger U-Net batch"""
    half_precision: bool = True
    """stable-diffusion, deepfloyd-if: fp16 weights on CUDA (a CPU always computes in fp32)"""
    low_vram: bool = False
    """stable-diffusion, deepfloyd-if on CUDA: the text encoder encodes on the CPU (bfloat16) instead of
    visiting the GPU, and attention is computed in slices: less GPU memory, slower steps and prompts"""
    frozen_unet: bool = True
    """embedded prior: run its U-Net as a TorchScript graph frozen once per input shape (the same
    numbers as eager, about 10% less time a call on a CPU; off: eager PyTorch)"""
    use_render_conditions: bool = True
    """a camera-aware prior is told each render's camera, light and shading mode (off: text only)"""
    camera_guidance_scale: float = 0.0
    """camera-aware prior: weight w_c of a second guidance term, w_c (eps(y, c) - eps(y, {})), that
    amplifies what the render conditions add to the prediction (0: off; costs a third U-Net branch)"""
    use_alpha: bool = True
    """a prior with an opacity channel also grades (and pushes) the renders' opacity"""
    random_background: float = 1.0
    """with a prior trained on random solid backgrounds: the fraction of renders it grades on a
    random colour instead of the scene's background (others, and other priors, always see the scene's)"""


# ----------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    """Adam on the grid, the loss terms' weights, and the guard against bad steps."""

    lr: float = 0.05
    """learning rate of the density and albedo grids"""
    lr_density: float | None = None
    """the density grid's own learning rate (None: lr)"""
    lr_background: float = 1e-3
    lr_decay_start: float = 1.0
    """fraction of the run after which the grid learning rates decay (1: never)"""
    lr_final_factor: float = 0.1
    """the learning rates at the end of the run, as a fraction of their start (exponential decay)"""
    grad_clip: float = 10.0
    orientation_weight: float = 0.01
    """final weight of the Ref-NeRF orientation loss (ramped up from 0)"""
    orientation_ramp: float = 0.5
    """fraction of the run over which the orientation weight ramps up"""
    opacity_weight: float = 50.0
    """weight of the mean-opacity (sparsity) regulariser against fog (the SDS gradient is summed
    over pixels and this mean is not, hence the size)"""
    entropy_weight: float = 0.0
    """weight of the opacity-entropy term (mean binary entropy over pixels, like the opacity term a mean): against
    half-transparent pixels"""
    tv_weight: float = 5.0
    """weight of total variation on the raw density grid (mean over voxels of squared neighbour differences):
    smooths the surface's fur and the fringe no view constrains"""
    tv_albedo_weight: float = 0.0
    """weight of total variation on the albedo logits"""
    grad_norm_every: int = 0
    """log each loss term's gradient norm on the grid every this many steps (0: never; costs a backward per term)"""


@dataclass
class TrainConfig:
    """One text-to-3D run."""

    steps: int = 1200
    seed: int = 0
    render_size: int = 64
    """training render resolution (the prior sees it resized to its own size)"""
    views: int = 2
    """cameras per iteration"""
    device: str = "cpu"
    preview_every: int = 25
    camera: CameraConfig = dataclass_field(default_factory=CameraConfig)
    """the camera/light distribution of training; see camera_from_prior"""
    camera_from_prior: bool = True
    """draw cameras and lights from the distribution the prior was trained on, where it declares one
    (the embedded priors do), instead of ``camera``"""
    shading_probs: tuple[float, float, float] = SHADING_PROBS
    """probabilities of the lit, textureless and albedo shading modes"""
    field: FieldConfig = dataclass_field(default_factory=FieldConfig)
    render: RenderConfig = dataclass_field(default_factory=RenderConfig)
    guidance: GuidanceConfig = dataclass_field(default_factory=GuidanceConfig)
    optim: OptimConfig = dataclass_field(default_factory=OptimConfig)


# ----------------------------------------------------------------------------- export


MESH_FORMATS = ("glb", "obj", "ply")
VIDEO_FORMATS = ("mp4", "gif", "none")


@dataclass
class ExportOptions:
    """What to write at the end of a run."""

    formats: tuple[str, ...] = MESH_FORMATS
    """mesh formats to write (glb, obj, ply)"""
    mesh_resolution: int = 128
    """marching-cubes grid per side"""
    threshold: float | None = None
    """density level of the surface (default: chosen by --export.level)"""
    level: str = "silhouette"
    """how the surface level is chosen when no threshold is given: silhouette (the level whose
    silhouettes match the renders' opacity > 0.5 from a ring of views) or fixed (opacity 0.5 over a
    0.15-unit segment, the first version's rule)"""
    colour_depth: float = 2.0
    """vertex colours composite the albedo along the normal from this many grid voxels outside the
    surface to as many inside, as a ray sees it: the albedo the renders show, not the unconstrained
    albedo of the fog at the level itself (0: the albedo at the vertex)"""
    fill_voids: str = "axes"
    """which voids inside the surface become solid: none, enclosed (fully closed ones), or axes (also
    those enclosed from 5 of the 6 axis directions); a scene is a shell of density, its mesh a solid"""
    video: str = "mp4"
    """turntable format: mp4, gif or none"""
    video_mode: str = "lit"
    """shading of the turntable: lit, textureless, albedo, normals, depth"""
    video_frames: int = 36
    video_size: int = 128


# ----------------------------------------------------------------------------- the embedded prior's training


@dataclass
class TrainPriorConfig:
    """Training of the embedded prior."""

    out: Path = TRAINING_PRIOR_DIR
    """folder for config, weights, resume state, log and sample grid (default: the prior in training,
    assets/prior_v2; the shipped assets/prior is a snapshot of it taken when it measured better)"""
    steps: int = 20000
    """total optimiser steps (a resumed run continues up to this)"""
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 200
    """steps of linear learning-rate warm-up, also after each resume"""
    cooldown: int = 0
    """the last this many steps before ``steps``: the learning rate falls linearly from ``lr`` to 0
    (warm-up, stable, decay); a resumed run keeps the same schedule (0: constant to the end)"""
    ema_decay: float = 0.999
    caption_dropout: float = 0.2
    """probability of training on the empty prompt (the unconditional branch of guidance)"""
    view_label_dropout: float = 0.0
    """probability that a (non-empty) caption is trained without its view label, the phrase alone: the
    camera must then come from the render conditions, which a camera-aware prior otherwise leaves to
    the label's three words (0: always with it, as before)"""
    condition_dropout: float = 0.1
    """camera-aware prior: probability of dropping the render conditions (independently of the
    caption), so the prior also works from the text alone"""
    min_snr: float = 5.0
    """min-SNR-gamma loss weighting (Hang et al. 2023): min(SNR, gamma) / SNR on the epsilon loss; 0 for plain MSE"""
    high_t_weight_cap: float = 20.0
    """the epsilon loss is also weighted by min(1 / alpha_bar, this): v-prediction's weighting up to a
    cap, so a wrong image estimate at high t costs what it should (1: off; see prior.train.diffusion_loss;
    prior v2 from step 4,250, docs/prior.md)"""
    high_t_fraction: float = 0.5
    """fraction of each batch whose timesteps are drawn from the upper half of the schedule only
    (the rest from all of it): more of the training where the image is mostly noise, the only place
    where the camera decides what the prior should draw (0: uniform timesteps; prior v2 from step 3,500)"""
    asymmetric_fraction: float = 0.0
    """fraction of training images whose object is drawn from the asymmetric nouns only (mug, chair,
    house, snowman: where every azimuth looks different, so the camera decides the picture); the rest
    from all nouns (0: every noun equally often, as before)"""
    synonyms: bool = True
    """captions also name objects and colours in other words (prior.world.NOUN_WORDS, COLOUR_WORDS)"""
    checkpoint_every: int = 250
    grid_every: int = 1000
    threads: int = 1
    seed: int = 0
    max_minutes: float = 0.0
    """stop after this many minutes (0: no limit)"""
    device: str = "cpu"


# ----------------------------------------------------------------------------- validation and (de)serialisation


def validate_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, each with one clear sentence (``ValueError``)."""
    if cfg.steps <= 0:
        raise ValueError(f"steps must be positive, got {cfg.steps}")
    if not 8 <= cfg.render_size <= MAX_RENDER_SIZE:
        raise ValueError(f"render size must be between 8 and {MAX_RENDER_SIZE} pixels, got {cfg.render_size}")
    if not 8 <= cfg.field.resolution <= 256:
        raise ValueError(f"grid resolution must be between 8 and 256, got {cfg.field.resolution}")
    coarse = list(cfg.field.coarse_resolutions)
    if any(not 4 <= r < cfg.field.resolution for r in coarse) or coarse != sorted(coarse):
        raise ValueError(f"coarse resolutions must rise from 4 to below the grid's {cfg.field.resolution}, got {cfg.field.coarse_resolutions}")
    if cfg.field.blob_fade_steps < 0:
        raise ValueError(f"blob_fade_steps must be 0 (the blob stays) or more, got {cfg.field.blob_fade_steps}")
    if cfg.field.density_activation not in ("softplus", "exp"):
        raise ValueError(f"unknown density activation {cfg.field.density_activation!r}; use softplus or exp")
    if cfg.views <= 0 or cfg.views > 16:
        raise ValueError(f"views per step must be between 1 and 16, got {cfg.views}")
    if len(cfg.shading_probs) != 3 or min(cfg.shading_probs) < 0 or sum(cfg.shading_probs) <= 0:
        raise ValueError(f"shading probabilities must be three non-negative numbers (lit, textureless, albedo), got {cfg.shading_probs}")
    if cfg.device not in ("cpu", "mps") and not cfg.device.startswith("cuda"):
        raise ValueError(f"unknown device {cfg.device!r}; use cpu or cuda")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} was asked for but this machine has no CUDA GPU; use --device cpu")
    g = resolve_guidance(cfg.guidance) if cfg.guidance.name in GUIDANCES else cfg.guidance  # the timesteps that will run
    if not 0 <= g.t_min < g.t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got {g.t_min}, {g.t_max}")
    if g.t_max_end is not None and not g.t_min < g.t_max_end <= 1:
        raise ValueError(f"need t_min < t_max_end <= 1, got t_min {g.t_min}, t_max_end {g.t_max_end}")
    top = g.t_max if g.t_max_end is None else min(g.t_max, g.t_max_end)
    if g.t_min_start is not None and not 0 <= g.t_min_start < top:
        raise ValueError(f"need 0 <= t_min_start < {top} (t_max, and t_max_end if set), got {g.t_min_start}")
    if not (g.camera_guidance_scale >= 0 and math.isfinite(g.camera_guidance_scale)):
        raise ValueError(f"camera guidance scale must be a finite number >= 0, got {g.camera_guidance_scale}")
    if not 1 <= g.draws <= 16:
        raise ValueError(f"SDS draws per render must be between 1 and 16, got {g.draws}")
    if g.guidance_scale is not None and (g.guidance_scale < 0 or not math.isfinite(g.guidance_scale)):
        raise ValueError(f"guidance scale must be a non-negative number, got {g.guidance_scale}")
    if not 0 <= g.random_background <= 1:
        raise ValueError(f"the random-background fraction must be between 0 and 1, got {g.random_background}")


def with_settings(cfg: TrainConfig, *, steps: int | None = None, seed: int | None = None, guidance: str | None = None,
                  model: str | None = None, guidance_scale: float | None = None, render_size: int | None = None, views: int | None = None,
                  device: str | None = None) -> TrainConfig:
    """The one builder of a run's configuration from the settings a user gives (the command line's
    top-level options, the app's settings, the benchmark's flags): ``cfg`` with each setting that is
    not None replaced. Choosing another prior resets the guidance weight to that prior's own default
    unless a weight is given; an unknown prior is a ``ValueError``."""
    from dataclasses import replace

    g = cfg.guidance
    if guidance is not None and guidance != g.name:
        guidance_spec(guidance)
        g = replace(g, name=guidance, guidance_scale=None)
    if model is not None:
        g = replace(g, model=model)
    if guidance_scale is not None:
        g = replace(g, guidance_scale=guidance_scale)
    top = {"steps": steps, "seed": seed, "render_size": render_size, "views": views, "device": device}
    return replace(cfg, guidance=g, **{k: v for k, v in top.items() if v is not None})


def config_to_dict(cfg: object) -> dict:
    return asdict(cfg)


def _from_dict(cls: type, data: dict) -> object:
    """A dataclass from a (JSON) dict: nested dataclasses rebuilt, lists back to tuples where the
    default is a tuple; unknown keys are an error (``TypeError``), missing ones take defaults."""
    kwargs = {}
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise TypeError(f"unknown setting(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default) and isinstance(value, dict):
            value = _from_dict(type(default), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    return _from_dict(TrainConfig, data)


# ----------------------------------------------------------------------------- the guidance registry


@dataclass(frozen=True)
class GuidanceSpec:
    """A guidance by name: where its class lives and its own defaults."""

    name: str
    target: str
    """module:Class, imported only when the guidance is used"""
    guidance_scale: float
    """its default classifier-free guidance weight w"""
    user_facing: bool
    """offered by the app and the command line's help (the reference guidance is a measuring instrument)"""
    description: str
    timesteps: tuple[float, float, float | None, float | None] | None = None
    """its own (t_min, t_max, t_max_end, t_min_start), for those a config leaves at GuidanceConfig's
    defaults (None: GuidanceConfig's)"""


GUIDANCES: dict[str, GuidanceSpec] = {
    # 3 for the embedded prior since 2026-12-06: guidance pulls colours away from the truth in
    # proportion to w (saturated albedo at 10), and at 5 it turns the cubes 20-40 degrees about the
    # vertical (no stable yaw at 0); with prior v2 at step 16,000+ the white mug no longer vanishes
    # at 3, as it did with step 3,250 (docs/ablations.md, "The guidance weight again")
    "embedded": GuidanceSpec("embedded", "dreamfusion.guidance.embedded:EmbeddedGuidance", 3.0, True,
                             "the shipped prior of the procedural world: offline, on a CPU"),
    "stable-diffusion": GuidanceSpec("stable-diffusion", "dreamfusion.guidance.stable_diffusion:StableDiffusionGuidance", 100.0, True,
                                     "Stable Diffusion through diffusers: a local folder or a hub id, best on a GPU"),
    # w 20 and t ~ U(0.02, 0.98) with the paper's w(t): threestudio's dreamfusion-if config (stable-dreamfusion's IF
    # guidance draws from the same range)
    "deepfloyd-if": GuidanceSpec("deepfloyd-if", "dreamfusion.guidance.deepfloyd_if:DeepFloydIFGuidance", 20.0, True,
                                 "DeepFloyd IF stage I (64 px, pixel space, T5 text) through diffusers: a local folder or a hub id, "
                                 "on a GPU", timesteps=(0.02, 0.98, None, None)),
    "reference": GuidanceSpec("reference", "dreamfusion.guidance.reference:ReferenceGuidance", 0.0, False,
                              "exact renders of the prompt's true object in place of a prior: the engine's ceiling"),
}
USER_GUIDANCES = tuple(name for name, spec in GUIDANCES.items() if spec.user_facing)


def guidance_spec(name: str) -> GuidanceSpec:
    """The registry entry of a guidance; ``ValueError`` naming the valid ones."""
    if name not in GUIDANCES:
        raise ValueError(f"unknown guidance {name!r}; valid names: {', '.join(GUIDANCES)}")
    return GUIDANCES[name]


TIMESTEP_SETTINGS = ("t_min", "t_max", "t_max_end", "t_min_start")


def resolve_guidance(cfg: GuidanceConfig) -> GuidanceConfig:
    """``cfg`` with the guidance's own defaults filled in where it leaves them open: the guidance
    weight where it is None, and the timestep settings still at GuidanceConfig's defaults where the
    registry gives the prior its own (a setting given explicitly with the default's value is
    taken as left open)."""
    from dataclasses import replace

    spec = guidance_spec(cfg.name)
    changes: dict = {} if cfg.guidance_scale is not None else {"guidance_scale": spec.guidance_scale}
    if spec.timesteps is not None:
        defaults = GuidanceConfig()
        changes.update({k: v for k, v in zip(TIMESTEP_SETTINGS, spec.timesteps, strict=True)
                        if getattr(cfg, k) == getattr(defaults, k)})
    return replace(cfg, **changes) if changes else cfg
