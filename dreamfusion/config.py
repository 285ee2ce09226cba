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
TRAINING_PRIOR_DIR = ASSET_DIR.parent / "prior_training"
"""the resume state of the prior in training (raw weights and log), what ``train-prior`` continues
by default; the EMA weights and config that go with it are the shipped prior's while the two are
at the same step, and only a prior trained further keeps its own here"""
MAX_RENDER_SIZE = 512
MAX_SEED = 2**63 - 1
"""seeds are 0..2^63 - 1, what ``torch.Generator.manual_seed`` takes without wrapping"""
MAX_STEPS = 1_000_000
MAX_IMAGE_SIZE = 1024
"""largest side of a rendered image or turntable frame, in pixels"""
MAX_TURNTABLE_FRAMES = 360
MAX_TURNTABLE_PIXELS = 360 * 512 * 512
"""a turntable is held in memory whole before it is encoded: frames x size^2 stays under this
(about 280 MB of RGB)"""


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


#: the distribution of a version-1 prior folder, whose config.json predates the camera field: wider
#: framing, elevation from -10, light + ambient up to 1.2
LEGACY_CAMERA = CameraConfig(elevation_range=(-10.0, 90.0), distance_range=(1.6, 2.1), focal_range=(0.95, 1.25), zoom_range=None,
                             light_intensity_range=(0.6, 0.9), ambient_range=(0.1, 0.3))


#: what a render can show: lit (Lambertian), textureless (white albedo, lit), albedo, normals, depth
SHADING_MODES = ("lit", "textureless", "albedo", "normals", "depth")
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
    blob_fade_fraction: float = 0.5
    """the blob's inside fades to nothing over this fraction of the run from the start (its outside,
    which keeps empty space empty, stays): the blob starts the object, then gets out of the way so
    holes can open. A fraction, so the schedule compresses with a shorter run"""
    blob_fade_steps: int = 150
    """the fade never takes fewer steps than this, so a very short run keeps most of its blob instead
    of ending with nothing to export (0: the blob stays, no fade at all)"""
    density_activation: str = "exp"
    """exp (truncated) or softplus of the interpolated raw density plus the blob: with exp a few
    units of raw density separate empty from opaque, so surfaces can be sharp and holes carved"""
    sdf_fraction: float = 0.5
    """the last this fraction of the run trains a signed distance grid instead of a density: at that
    point the density's surface (its silhouette level) becomes a signed distance (positive inside), and
    the density is VolSDF's Laplace density of it, so the surface is a zero crossing held to a
    distance field by the eikonal term (optim.eikonal_weight): flat faces, crisp edges, open cavities
    (public list, two seeds: median normal error 4.4 -> 3.2 deg, IoU held; docs/assets.md). 0: density
    throughout"""
    sdf_beta: float = 0.01
    """the Laplace density's scale at the end (world units; a voxel is 0.024)"""
    sdf_beta_start: float = 0.02
    """its scale when the grid becomes a signed distance; it shrinks geometrically to sdf_beta over
    the first half of that part of the run"""
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
    early_stop_eps: float = 1e-4
    """early ray termination: samples met once a ray's transmittance has fallen below this are not
    shaded (nerfacc's ``early_stop_eps``; their weights are below it); 0 shades every sample"""


# ----------------------------------------------------------------------------- guidance


@dataclass
class GuidanceConfig:
    """The prior that grades renders (Score Distillation Sampling)."""

    name: str = "embedded"
    """which prior: embedded (shipped, offline), stable-diffusion or deepfloyd-if"""
    model: str = ""
    """stable-diffusion, deepfloyd-if: a local folder or a hub id; embedded: a folder other than assets/prior"""
    guidance_scale: float | None = None
    """classifier-free guidance weight w (None: the prior's own default, from the guidance registry)"""
    t_min: float = 0.02
    """the timestep range's lower bound, as a fraction of the schedule. The four timestep settings
    left at their defaults here take the prior's own where its registry entry gives them
    (deepfloyd-if: the peers' U(0.02, 0.98) throughout)"""
    t_max: float = 0.98
    t_max_end: float | None = 0.8
    """anneal t_max linearly to this over the run (None: no annealing, the paper's U(t_min, t_max)
    throughout): the run keeps its highest timesteps for most of its length (a dumbbell's two balls
    need them) and ends without the noisiest ones, which pull colours away from the prompt's; lower
    values leave too few high timesteps to form separate parts (docs/ablations.md)"""
    t_min_start: float | None = 0.7
    """start the run with the lower bound at this and lower it linearly to t_min over the run (None:
    t_min throughout): high timesteps first, as DreamTime argues. Left out early, the low timesteps
    cannot erase a part that is still faint, such as a chair's backrest (docs/ablations.md)"""
    weighting: str = "sds"
    """w(t) of the SDS gradient: sds (1 - alpha_bar_t, the paper's) or uniform"""
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
    cpu_bfloat16: str = "auto"
    """embedded prior on a CPU: its frozen U-Net computes in bfloat16: auto (where the CPU has it in
    hardware, AVX512-BF16 or AMX: about a third less time a call, docs/speed.md), on, or off (float32)"""
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

    lr: float = 0.1
    """learning rate of the density and albedo grids (higher for a shorter run: the grid must travel
    as far in fewer steps; docs/speed.md has the curve)"""
    lr_density: float | None = None
    """the density grid's own learning rate (None: lr)"""
    lr_background: float = 1e-3
    lr_decay_start: float = 0.75
    """fraction of the run after which the grid learning rates decay (1: never): the last quarter
    settles the surface and its colours instead of stirring them (public list, seeds 0 and 1:
    normals, colour noise and colour error lower, IoU held; docs/ablations.md)"""
    lr_final_factor: float = 0.1
    """the learning rates at the end of the run, as a fraction of their start (exponential decay)"""
    grad_clip: float = 10.0
    orientation_weight: float = 0.01
    """final weight of the Ref-NeRF orientation loss (ramped up from 0)"""
    orientation_ramp: float = 0.5
    """fraction of the run over which the orientation weight ramps up"""
    opacity_weight: float = 50.0
    """weight of the mean-opacity (sparsity) regulariser against fog (the SDS gradient is summed
    over pixels and this mean is not, hence the size); while the grid is a density only (a signed
    distance has no fog, and the term would only erode the surface where no view holds it)"""
    entropy_weight: float = 0.0
    """weight of the opacity-entropy term (mean binary entropy over pixels, like the opacity term a mean): against
    half-transparent pixels"""
    tv_weight: float = 15.0
    """weight of total variation on the raw density grid (mean over voxels of squared neighbour differences):
    smooths the surface's fur and the fringe no view constrains (15 rather than 5: normal error 6.3 -> 5.2
    deg median on the public list, two seeds, IoU within 0.002; docs/ablations.md)"""
    eikonal_weight: float = 0.1
    """weight of the eikonal term once the grid is a signed distance (field.sdf_fraction): the mean of
    (|grad s| - 1)^2 over the nodes within three voxels of the surface"""
    sdf_smoothness_weight: float = 10.0
    """weight of the normal variation of a signed distance grid (losses.normal_variation), while the
    grid is one: against the ripple SDS leaves on its surface, without rounding sharp edges"""
    lr_sdf: float = 0.002
    """the density grid's learning rate once it is a signed distance (world units, not log density)"""
    sdf_adam_eps: float = 0.03
    """Adam's epsilon for the signed distance grid: a node whose gradients are much smaller than this
    (most nodes: a view meets the surface's few) moves by a fraction of the rate instead of the whole of
    it, so places no view constrains, such as the underside, do not drift and tear"""
    tv_albedo_weight: float = 15.0
    """weight of total variation on the albedo logits: evens out the speckle of flat colours
    (public list: colour noise within parts 0.032 -> 0.025, colour error 0.040 -> 0.036, IoU held)"""
    grad_norm_every: int = 0
    """log each loss term's gradient norm on the grid every this many steps (0: never; costs a backward per term)"""


@dataclass
class TrainConfig:
    """One text-to-3D run."""

    steps: int = 500
    """iterations: 500 of four views hold the quality of 800 of two, and of 1,200, on the public list
    (docs/speed.md; --preset fast and best are the shorter and the longer runs)"""
    seed: int = 0
    render_size: int = 64
    """training render resolution (the prior sees it resized to its own size)"""
    views: int = 4
    """cameras per iteration: at the prior's 32 px a step's cost is mostly per call, not per view
    (four views cost a third more than two), so four views a step for fewer steps are quicker than two"""
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
    0.15-unit segment)"""
    colour_depth: float = 2.0
    """vertex colours composite the albedo along the normal from this many grid voxels outside the
    surface to as many inside, as a ray sees it: the albedo the renders show, not the unconstrained
    albedo of the fog at the level itself (0: the albedo at the vertex)"""
    fill_voids: str = "axes"
    """which voids inside the surface become solid: none, enclosed (fully closed ones), or axes (also
    those enclosed from 5 of the 6 axis directions); a scene is a shell of density, its mesh a solid"""
    refine_steps: int = 3
    """Newton steps that move each marching-cubes vertex along the density's gradient onto the
    surface's level (at most half a voxel): flatter faces and crisper edges than linear
    interpolation along grid edges gives (0: off). The defaults of these asset steps are measured
    on the public list in docs/assets.md"""
    field_smoothing: float = 0.5
    """standard deviation, in grid voxels, of a Gaussian blur of the raw density grid before the
    surface level is chosen and the surface extracted (the turntable keeps the trained field): the
    level set of a density whose transition is thinner than a voxel steps from one grid layer to the
    next ("wood grain"), and half a voxel evens the steps out; a voxel or more rounds thin parts and
    points (0: off)"""
    surface_smoothing: int = 30
    """iterations of Taubin's lambda|mu smoothing of the surface, after the refinement and before
    decimation: ripples of a few faces even out, the volume stays (0: off)"""
    faces: int = 20000
    """face budget: quadric decimation down to at most this many faces (fast-simplification), the
    distance it moved the surface reported in the run's notes; a lighter file, flat regions in few
    faces (0: every face marching cubes makes)"""
    colour_smoothing: int = 64
    """iterations of edge-aware smoothing of the vertex colours: each becomes the mean of itself and
    its neighbours within --export.colour-edge of it, so speckle evens out and sharp changes of
    colour stay sharp (0: off)"""
    colour_edge: float = 0.1
    """colour smoothing averages only neighbours whose colours differ by at most this much in every
    RGB channel (0..1): a larger step is a boundary between colours and is kept"""
    texture: bool = False
    """also write mesh_textured.glb: UVs from xatlas, the vertex colours baked into a PNG texture
    inside the file, an unlit material (KHR_materials_unlit) so viewers show the albedo as it is"""
    texture_size: int = 1024
    """pixels per side of the textured GLB's texture"""
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
    """folder for config, weights, resume state, log and sample grid; a folder that holds a resume
    state is continued (default: the prior in training, whose snapshot is the shipped assets/prior)"""
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
    the label's three words (0: always with it)"""
    condition_dropout: float = 0.1
    """camera-aware prior: probability of dropping the render conditions (independently of the
    caption), so the prior also works from the text alone"""
    min_snr: float = 5.0
    """min-SNR-gamma loss weighting (Hang et al. 2023): min(SNR, gamma) / SNR on the epsilon loss; 0 for plain MSE"""
    high_t_weight_cap: float = 20.0
    """the epsilon loss is also weighted by min(1 / alpha_bar, this): v-prediction's weighting up to a
    cap, so a wrong image estimate at high t costs what it should (1: off; see prior.train.diffusion_loss)"""
    high_t_fraction: float = 0.5
    """fraction of each batch whose timesteps are drawn from the upper half of the schedule only
    (the rest from all of it): more of the training where the image is mostly noise, the only place
    where the camera decides what the prior should draw (0: uniform timesteps)"""
    asymmetric_fraction: float = 0.0
    """fraction of training images whose object is drawn from the asymmetric nouns only (mug, chair,
    house, snowman: where every azimuth looks different, so the camera decides the picture); the rest
    from all nouns (0: every noun equally often)"""
    synonyms: bool = True
    """captions also name objects and colours in other words (prior.world.NOUN_WORDS, COLOUR_WORDS)"""
    checkpoint_every: int = 250
    grid_every: int = 1000
    threads: int = 1
    seed: int = 0
    max_minutes: float = 0.0
    """stop after this many minutes (0: no limit)"""
    device: str = "cpu"


# ----------------------------------------------------------------------------- validation


def _number(value: float) -> str:
    """1000000 as '1000000' (not '1e+06'), 0.5 as '0.5'."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _between(what: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {_number(low)} and {_number(high)}, got {_number(value)}")


def _at_least(what: str, value: float, low: float) -> None:
    if not value >= low:
        raise ValueError(f"{what} must be {_number(low)} or more, got {_number(value)}")


def _one_of(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; use {', '.join(valid[:-1])} or {valid[-1]}")


def _range_pair(what: str, pair: tuple[float, float], low: float, high: float) -> None:
    """A (low, high) range of a random draw: both inside [low, high], in order."""
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{what} must be two numbers low <= high within {_number(low)}..{_number(high)}, got {tuple(pair)}")


def validate_prompt(prompt: str) -> str:
    """The prompt with its whitespace normalised; a ``ValueError`` for an empty one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe an object, e.g. 'a red cube'")
    return " ".join(prompt.split())


def validate_seed(seed: int) -> int:
    """A seed of 0..:data:`MAX_SEED` (the command line, a batch's prompt list and the app take the same)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to 2^63 - 1, got {seed!r}")
    return seed


def validate_camera(cam: CameraConfig) -> None:
    _range_pair("camera elevation_range (degrees)", cam.elevation_range, -90.0, 90.0)
    _range_pair("camera azimuth_range (degrees)", cam.azimuth_range, -720.0, 720.0)
    _range_pair("camera distance_range", cam.distance_range, 1e-3, 100.0)
    _range_pair("camera focal_range", cam.focal_range, 1e-3, 100.0)
    if cam.zoom_range is not None:
        _range_pair("camera zoom_range", cam.zoom_range, 1e-3, 100.0)
    _between("camera light_jitter", cam.light_jitter, 0.0, 100.0)
    _range_pair("camera light_intensity_range", cam.light_intensity_range, 0.0, 10.0)
    _range_pair("camera ambient_range", cam.ambient_range, 0.0, 10.0)


def validate_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, each with one clear sentence (``ValueError``). Every size
    that sets an allocation is bounded here, so a configuration read from a file (a checkpoint's)
    is refused before anything is allocated for it."""
    if cfg.steps <= 0:
        raise ValueError(f"steps must be positive, got {cfg.steps}")
    _between("steps", cfg.steps, 1, MAX_STEPS)
    validate_seed(cfg.seed)
    if not 8 <= cfg.render_size <= MAX_RENDER_SIZE:
        raise ValueError(f"render size must be between 8 and {MAX_RENDER_SIZE} pixels, got {cfg.render_size}")
    if cfg.views <= 0 or cfg.views > 16:
        raise ValueError(f"views per step must be between 1 and 16, got {cfg.views}")
    _at_least("preview_every", cfg.preview_every, 0)
    if len(cfg.shading_probs) != 3 or min(cfg.shading_probs) < 0 or sum(cfg.shading_probs) <= 0:
        raise ValueError(f"shading probabilities must be three non-negative numbers (lit, textureless, albedo), got {cfg.shading_probs}")
    validate_camera(cfg.camera)
    if cfg.device not in ("cpu", "mps") and not cfg.device.startswith("cuda"):
        raise ValueError(f"unknown device {cfg.device!r}; use cpu or cuda")

    f = cfg.field
    if not 8 <= f.resolution <= 256:
        raise ValueError(f"grid resolution must be between 8 and 256, got {f.resolution}")
    coarse = list(f.coarse_resolutions)
    if any(not 4 <= r < f.resolution for r in coarse) or coarse != sorted(coarse):
        raise ValueError(f"coarse resolutions must rise from 4 to below the grid's {f.resolution}, got {f.coarse_resolutions}")
    _between("coarse_fraction", f.coarse_fraction, 0.0, 1.0)
    _between("the scene's bound", f.bound, 1e-3, 100.0)
    _between("blob_radius", f.blob_radius, 1e-6, 100.0)
    _between("blob_density", f.blob_density, -1e4, 1e4)
    _between("density_shift", f.density_shift, -1e4, 1e4)
    if f.blob_fade_steps < 0:
        raise ValueError(f"blob_fade_steps must be 0 (the blob stays) or more, got {f.blob_fade_steps}")
    _between("field.blob_fade_fraction", f.blob_fade_fraction, 0.0, 1.0)
    if f.density_activation not in ("softplus", "exp"):
        raise ValueError(f"unknown density activation {f.density_activation!r}; use softplus or exp")
    _between("field.sdf_fraction", f.sdf_fraction, 0.0, 1.0)
    _between("field.sdf_beta", f.sdf_beta, 1e-4, 1.0)
    _between("field.sdf_beta_start", f.sdf_beta_start, 1e-4, 1.0)
    _between("optim.lr_sdf", cfg.optim.lr_sdf, 0.0, 1.0)
    _between("optim.sdf_adam_eps", cfg.optim.sdf_adam_eps, 0.0, 1.0)
    _between("optim.eikonal_weight", cfg.optim.eikonal_weight, 0.0, 1e6)
    _between("optim.sdf_smoothness_weight", cfg.optim.sdf_smoothness_weight, 0.0, 1e6)
    _one_of("background", f.background, ("white", "black", "mlp"))

    r = cfg.render
    _between("samples_per_ray", r.samples_per_ray, 1, 1024)
    _between("occupancy grid resolution", r.occupancy_resolution, 4, 256)
    _between("occupancy_threshold", r.occupancy_threshold, 0.0, 1e6)
    _between("early_stop_eps", r.early_stop_eps, 0.0, 1.0)
    _between("occupancy_update_every", r.occupancy_update_every, 1, MAX_STEPS)
    _at_least("occupancy_warmup", r.occupancy_warmup, 0)
    _one_of("sampler", r.sampler, ("auto", "torch", "dense"))

    guidance_spec(cfg.guidance.name)
    g = resolve_guidance(cfg.guidance)  # the timesteps that will run (a prior's registry entry may set them)
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
    _one_of("SDS weighting", g.weighting, ("sds", "uniform"))
    _one_of("cpu_bfloat16", g.cpu_bfloat16, ("auto", "on", "off"))

    o = cfg.optim
    for name in ("lr", "lr_background", "grad_clip"):
        _between(f"optim.{name}", getattr(o, name), 0.0, 1e6)
    if o.lr_density is not None:
        _between("optim.lr_density", o.lr_density, 0.0, 1e6)
    _between("optim.lr_decay_start", o.lr_decay_start, 0.0, 1.0)
    _between("optim.lr_final_factor", o.lr_final_factor, 1e-12, 1.0)
    _between("optim.orientation_ramp", o.orientation_ramp, 0.0, 1.0)
    for name in (f.name for f in fields(o) if f.name.endswith("_weight")):  # every loss term's
        _between(f"optim.{name}", getattr(o, name), 0.0, 1e12)
    _at_least("optim.grad_norm_every", o.grad_norm_every, 0)

    if cfg.device.startswith("cuda"):  # last: the only check that imports torch
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} was asked for but this machine has no CUDA GPU; use --device cpu")


def validate_turntable(frames: int, size: int) -> None:
    """Bounds of a turntable (or any image): frames and size, and their product, which is memory."""
    _between("image size in pixels", size, 16, MAX_IMAGE_SIZE)
    _between("turntable frames", frames, 1, MAX_TURNTABLE_FRAMES)
    if frames * size * size > MAX_TURNTABLE_PIXELS:
        raise ValueError(f"a turntable of {frames} frames at {size} px is too large: frames x size^2 must stay under "
                         f"{MAX_TURNTABLE_PIXELS:,} (e.g. {MAX_TURNTABLE_PIXELS // (MAX_IMAGE_SIZE * MAX_IMAGE_SIZE)} frames at "
                         f"{MAX_IMAGE_SIZE} px, {MAX_TURNTABLE_FRAMES} at 512)")


def validate_export(opts: ExportOptions) -> None:
    if opts.fill_voids not in ("none", "enclosed", "axes"):
        raise ValueError(f"unknown void filling {opts.fill_voids!r}; use none, enclosed or axes")
    if opts.level not in ("silhouette", "fixed"):
        raise ValueError(f"unknown surface level rule {opts.level!r}; use silhouette or fixed")
    if opts.threshold is not None and not (opts.threshold > 0 and math.isfinite(opts.threshold)):
        raise ValueError(f"the surface threshold must be a positive density, got {opts.threshold}")
    bad = [f for f in opts.formats if f not in MESH_FORMATS]
    if bad:
        raise ValueError(f"unknown mesh format {bad[0]!r}; valid formats: {', '.join(MESH_FORMATS)}")
    if opts.video not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {opts.video!r}; valid formats: {', '.join(VIDEO_FORMATS)}")
    if not 16 <= opts.mesh_resolution <= 512:
        raise ValueError(f"mesh resolution must be between 16 and 512, got {opts.mesh_resolution}")
    _between("colour_depth (voxels)", opts.colour_depth, 0.0, 64.0)
    _between("refine_steps", opts.refine_steps, 0, 20)
    _between("surface_smoothing (iterations)", opts.surface_smoothing, 0, 100)
    _between("field_smoothing (voxels)", opts.field_smoothing, 0.0, 8.0)
    if opts.faces != 0:
        _between("faces (the face budget; 0: no decimation)", opts.faces, 100, 100_000_000)
    _between("colour_smoothing (iterations)", opts.colour_smoothing, 0, 100)
    _between("colour_edge", opts.colour_edge, 0.0, 1.0)
    _between("texture_size", opts.texture_size, 16, 8192)
    if opts.video != "none":
        _one_of("turntable shading", opts.video_mode, SHADING_MODES)
        validate_turntable(opts.video_frames, opts.video_size)


def validate_train_prior(cfg: TrainPriorConfig) -> None:
    """Reject settings of ``train-prior`` that cannot work (``ValueError``), before anything is loaded."""
    _between("steps", cfg.steps, 1, MAX_STEPS)
    _between("batch", cfg.batch, 1, 4096)
    _between("lr", cfg.lr, 1e-12, 1.0)
    if cfg.cooldown < 0 or cfg.warmup < 0:
        raise ValueError(f"warmup and cooldown must be 0 or more steps, got {cfg.warmup} and {cfg.cooldown}")
    _between("ema_decay", cfg.ema_decay, 0.0, 1.0)
    for name in ("caption_dropout", "view_label_dropout", "condition_dropout", "high_t_fraction", "asymmetric_fraction"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    _at_least("min_snr", cfg.min_snr, 0.0)
    _at_least("high_t_weight_cap", cfg.high_t_weight_cap, 0.0)
    _between("checkpoint_every", cfg.checkpoint_every, 1, MAX_STEPS)
    _between("grid_every", cfg.grid_every, 1, 10 * MAX_STEPS)
    _between("threads", cfg.threads, 1, 1024)
    _at_least("max_minutes", cfg.max_minutes, 0.0)
    validate_seed(cfg.seed)
    if cfg.device not in ("cpu", "mps") and not cfg.device.startswith("cuda"):
        raise ValueError(f"unknown device {cfg.device!r}; use cpu or cuda")


# ----------------------------------------------------------------------------- building and (de)serialisation


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


#: named trades of time against quality, as the settings each changes from TrainConfig's defaults
#: ('section.key': value, as ``--set`` takes them). The table of what each costs and gives on the
#: public list: docs/speed.md
PRESETS: dict[str, dict[str, object]] = {
    "fast": {"steps": 400, "views": 2, "optim.lr": 0.12, "optim.lr_decay_start": 1.0},
    "default": {},
    "best": {"steps": 1200, "views": 2, "optim.lr": 0.05, "optim.lr_decay_start": 1.0},
}


def apply_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    """``cfg`` with the preset's settings applied where ``cfg`` leaves them at TrainConfig's
    defaults (a setting given explicitly with the default's value is taken as left open, as with
    the guidance's own defaults); an unknown name is a ``ValueError`` naming the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    data, defaults = config_to_dict(cfg), config_to_dict(TrainConfig())
    for key, value in PRESETS[name].items():
        path = key.split(".")
        node, default = data, defaults
        for part in path[:-1]:
            node, default = node[part], default[part]
        if node[path[-1]] == default[path[-1]]:
            node[path[-1]] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(data)


def config_to_dict(cfg: object) -> dict:
    return asdict(cfg)


def _type_name(annotation: object) -> str:
    """How a setting's type reads in an error: 'int', 'null', 'a list of 2', 'a list'."""
    import typing

    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return "a list" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)}"
    return getattr(annotation, "__name__", None) or str(annotation)


def typed_value(annotation: object, value: object, where: str) -> object:
    """``value`` (read from JSON) as the type ``annotation`` of a config field asks for, or a
    ``ValueError`` naming the setting: the checks tyro makes of the command line, for settings read
    from a file. Lists become tuples, whole numbers are floats where a float is asked for, numbers
    must be finite; a bool is not a number."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return typed_value(option, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Path:
        if isinstance(value, str):
            return Path(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(typed_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(typed_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif is_dataclass(annotation):
        if isinstance(value, dict):
            return dataclass_from_dict(annotation, value, where)
    else:
        raise TypeError(f"{where}: no rule for settings of type {annotation!r}")
    raise ValueError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def dataclass_from_dict(cls: type, data: dict, where: str = "") -> object:
    """A config dataclass from a (JSON) dict, every value checked against its field's type
    (:func:`typed_value`); unknown keys are an error, missing ones take defaults. A ``ValueError``
    names the setting."""
    import typing

    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a JSON object of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) for {cls.__name__}: {', '.join(map(str, unknown))}")
    return cls(**{name: typed_value(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()})


def config_from_dict(data: dict) -> TrainConfig:
    """A :class:`TrainConfig` from its JSON form, types checked (not ranges: :func:`validate_config`)."""
    return dataclass_from_dict(TrainConfig, data)


def parse_override(text: str) -> tuple[list[str], object]:
    """'section.key=value' (or 'key=value' for a top-level setting) -> (path, value), the value
    read as JSON where it parses (numbers, true/false, null, lists) and as a string otherwise."""
    import json

    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``cfg`` with 'section.key=value' settings applied (the benchmarks' ``--set``), each checked
    against the typed config: an unknown key or a value of the wrong type is a ``ValueError``."""
    data = config_to_dict(cfg)
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {text!r}: no settings section {part!r}")
            node = node[part]
        if path[-1] not in node:
            raise ValueError(f"--set {text!r}: no setting {path[-1]!r} there (known: {', '.join(node)})")
        node[path[-1]] = value
    return config_from_dict(data)


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
    # embedded, w = 3: guidance pulls colours away from the truth in proportion to w (saturated
    # albedo at 10), and at 5 it turns the cubes about the vertical (docs/ablations.md, "The guidance
    # weight again")
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
