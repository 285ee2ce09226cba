"""Training the embedded prior: on-the-fly renders of the procedural world, EMA weights, resumable
checkpoints written to the output folder (fp16 EMA for use, fp16 raw weights + step for resume:
the optimiser restarts with a short warm-up instead of being stored), a loss log and a sample grid
at each checkpoint.

A folder that holds a resume state is continued. Its EMA weights and config are its own once it
has trained beyond the shipped prior; until then (``assets/prior_training``, whose resume state is
the shipped prior's) they are the shipped prior's, checked to be of the same step."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..cameras import default_light, orbit_cameras
from ..config import ASSET_DIR, TrainPriorConfig, validate_train_prior
from ..export import to_uint8
from ..files import atomic_write
from ..sds import noise_images
from .data import Batch, render_batch
from .model import RESUME_FILE, WEIGHTS_FILE, PriorConfig, RenderConditions, TextEncoder, predict_noise, save_prior_weights
from .sampling import image_grid, sample_images
from .vocabulary import VOCABULARY_FILE, Vocabulary

GRID_PROMPTS = (
    "a red cube, front view", "a blue sphere, side view", "a yellow cone, front view", "a green cube, front view",
    "a blue torus, overhead view", "a brown chair, front view", "a red chair, side view", "a white mug, front view",
    "a red mushroom, side view", "a white house, front view", "a snowman, front view", "a tree, side view",
    "a hamburger, front view", "a purple pyramid, front view", "a gray dumbbell, front view", "a crimson box, front view",
)
#: rows of the per-azimuth grid of a camera-aware prior (the view label follows the azimuth)
AZIMUTH_GRID_PHRASES = ("a red cube", "a white mug", "a red chair", "a white house", "a snowman", "a blue torus", "a gray dumbbell",
                        "a tree", "a hamburger", "a yellow cone")
AZIMUTH_GRID_VIEWS = 8


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)


def _save(cfg: TrainPriorConfig, prior_cfg: PriorConfig, model: torch.nn.Module, ema: dict[str, torch.Tensor], step: int,
          log: list[dict]) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_prior_weights(ema, prior_cfg, out, step)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / RESUME_FILE, lambda tmp: save_file(state, tmp, metadata={"step": str(step)}))
    with open(out / "train_log.jsonl", "a") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    log.clear()


def write_sample_grid(unet: torch.nn.Module, prior_cfg: PriorConfig, encoder: TextEncoder, path: Path,
                      seeds: tuple[int, ...] = (0, 1, 2, 3), guidance_scale: float = 1.0) -> None:
    """A text-only prior: 16 prompts x 4 seeds, two prompts per row. A camera-aware prior: one row
    per prompt of :data:`AZIMUTH_GRID_PHRASES` across 8 azimuths 45 degrees apart (elevation 20,
    lit, light at the camera, one seed per row), so view consistency can be seen; its coverage
    channel is not shown. ``guidance_scale``: diffusers' s; unguided by default, because this prior's
    guided samples are mangled where its unguided ones are recognisable (docs/prior.md), and SDS
    takes one guided step from a render rather than sampling from noise."""
    if prior_cfg.condition_features or prior_cfg.ray_channels:
        cams = orbit_cameras(AZIMUTH_GRID_VIEWS)
        conditions = RenderConditions.of(prior_cfg, cams, default_light(cams), ["lit"] * len(cams))
        from .world import caption

        prompts = [caption(p, float(a), float(e)) for p in AZIMUTH_GRID_PHRASES for a, e in zip(cams.azimuth, cams.elevation, strict=True)]
        seeds_ = [i for i in range(len(AZIMUTH_GRID_PHRASES)) for _ in range(len(cams))]
        imgs = sample_images(unet, prior_cfg, encoder, prompts, seeds_, guidance_scale=guidance_scale,
                             conditions=conditions.repeat(len(AZIMUTH_GRID_PHRASES)))
        rows = len(AZIMUTH_GRID_PHRASES)
    else:
        prompts = [p for p in GRID_PROMPTS for _ in seeds]
        imgs = sample_images(unet, prior_cfg, encoder, prompts, [s for _ in GRID_PROMPTS for s in seeds], guidance_scale=guidance_scale)
        rows = len(GRID_PROMPTS) // 2  # 16 prompts x 4 seeds -> 8 rows of 8
    grid = image_grid(F.interpolate(imgs[:, :3], scale_factor=2, mode="nearest"), rows=rows)
    iio.imwrite(path, to_uint8(grid))


def training_captions(batch: Batch, cfg: TrainPriorConfig, rng: random.Random) -> list[str]:
    """Each image's training caption: empty with probability ``caption_dropout`` (the unconditional
    branch), else the phrase alone with probability ``view_label_dropout``, else phrase and view
    label. The second draw is made only when that probability is above 0, so a recipe without it
    keeps its random stream (and its resumed runs) as before."""
    out = []
    for cap, phrase_only in zip(batch.captions, batch.phrases, strict=True):
        if rng.random() < cfg.caption_dropout:
            out.append("")
        elif cfg.view_label_dropout > 0 and rng.random() < cfg.view_label_dropout:
            out.append(phrase_only)
        else:
            out.append(cap)
    return out


def learning_rate(cfg: TrainPriorConfig, step: int, start_step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a run (re)started at ``start_step``:
    ``lr`` ramped up linearly over ``warmup`` steps from the (re)start, times the cool-down factor,
    which falls linearly from 1 to 0 over the last ``cooldown`` steps before ``steps``."""
    ramp = min(1.0, (step - start_step + 1) / max(cfg.warmup, 1))
    decay = 1.0 if cfg.cooldown <= 0 else min(1.0, max(0.0, (cfg.steps - step) / cfg.cooldown))
    return cfg.lr * ramp * decay


def sample_timesteps(n: int, num_train_timesteps: int, high_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) integer timesteps: each, with probability ``high_fraction``, uniform on the upper half
    [T/2, T) of the schedule, otherwise uniform on [0, T). Drawn from ``generator`` on the CPU."""
    if not 0.0 <= high_fraction <= 1.0:
        raise ValueError(f"high_t_fraction must be in [0, 1], got {high_fraction}")
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    if high_fraction > 0:
        half = num_train_timesteps // 2
        high = torch.randint(half, num_train_timesteps, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < high_fraction, high, t)
    return t


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor, min_snr: float = 0.0,
                   high_t_cap: float = 1.0) -> torch.Tensor:
    """Epsilon MSE per image, weighted by min(SNR, gamma) / SNR when ``min_snr`` = gamma > 0
    (SNR = alpha_bar / (1 - alpha_bar)), and by min(1 / alpha_bar, cap) when ``high_t_cap`` = cap > 1
    (v-prediction's weighting of the epsilon error, capped), averaged over the batch.
    (B, C, S, S) x 2, (B,) -> scalar.

    Why the second factor: an epsilon error costs the image estimate x0 that error times
    sqrt((1 - alpha_bar) / alpha_bar), so at high t, where x0 is all the text and the camera can
    tell (the noise hides the image), plain epsilon MSE makes a wrong x0 almost free; 1 / alpha_bar
    makes it count as an error of v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 would."""
    per_image = ((eps_pred.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))
    if min_snr > 0:
        snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
        per_image = per_image * snr.clamp(max=min_snr) / snr
    if high_t_cap > 1:
        per_image = per_image * (1 / alphas_cumprod_t).clamp(max=high_t_cap)
    return per_image.mean()


def saved_step(path: Path) -> int:
    """The step a prior's weights file was saved at (its metadata's ``step``)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("step", -1))


def resume_snapshot(out: Path, shipped: Path = ASSET_DIR) -> Path:
    """The folder whose EMA weights and config go with ``out``'s resume state: ``out``'s own, or,
    where it has none, the shipped prior's, which must be of the resume state's step (a
    ``ValueError`` otherwise: resuming would pair weights of two different steps)."""
    if (out / WEIGHTS_FILE).exists():
        return out
    step, shipped_step = saved_step(out / RESUME_FILE), saved_step(shipped / WEIGHTS_FILE)
    if step != shipped_step:
        raise ValueError(f"{out / RESUME_FILE} is of step {step} but {out} has no EMA weights of its own and the shipped prior "
                         f"({shipped}) is of step {shipped_step}; put the EMA weights and config of step {step} in {out}")
    return shipped


def train_prior(cfg: TrainPriorConfig, prior_cfg: PriorConfig | None = None, on_log: Callable[[str], None] = print) -> Path:
    validate_train_prior(cfg)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resume = out / RESUME_FILE
    snapshot = resume_snapshot(out) if resume.exists() else None
    if snapshot is not None:
        prior_cfg = PriorConfig.load(snapshot)
    prior_cfg = prior_cfg or PriorConfig()
    torch.manual_seed(cfg.seed)
    model = prior_cfg.unet().to(cfg.device)
    step = 0
    if snapshot is not None:
        step = saved_step(resume)
        model.load_state_dict({k: v.float() for k, v in load_file(str(resume)).items()})
        ema = {k: v.float().to(cfg.device) for k, v in load_file(str(snapshot / WEIGHTS_FILE)).items()}
        on_log(f"resumed from step {step}" + ("" if snapshot == out else f" (EMA weights and config of {snapshot})"))
    else:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    encoder = TextEncoder(prior_cfg.max_tokens, cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / VOCABULARY_FILE).exists():  # what the prior knows, for the out-of-vocabulary note
        Vocabulary(encoder).save(out)
    sched = prior_cfg.scheduler()
    alphas = sched.alphas_cumprod.to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed * 1000003 + step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
    start_step, t0, log = step, time.time(), []
    camera_cfg = prior_cfg.camera_config()  # the one distribution: SDS draws from the same
    with_alpha = prior_cfg.channels == 4
    while step < cfg.steps:
        if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
            break
        batch = render_batch(cfg.batch, prior_cfg.image_size, rng, gen, camera_cfg, with_alpha=with_alpha, synonyms=cfg.synonyms,
                             random_background=prior_cfg.random_background, asymmetric_fraction=cfg.asymmetric_fraction)
        x0 = (batch.images * 2 - 1).to(cfg.device)
        captions = training_captions(batch, cfg, rng)
        cond = encoder.condition(captions).to(cfg.device)
        present = torch.rand(cfg.batch, generator=gen) >= cfg.condition_dropout
        conditions = RenderConditions.of(prior_cfg, batch.cameras, batch.lights, batch.modes, present).to(cfg.device)
        t = sample_timesteps(cfg.batch, prior_cfg.num_train_timesteps, cfg.high_t_fraction, gen).to(cfg.device)
        noise = torch.randn(x0.shape, generator=gen).to(cfg.device)
        x_t = noise_images(x0, noise, alphas[t])
        loss = diffusion_loss(predict_noise(model, x_t, t, cond, conditions), noise, alphas[t], cfg.min_snr, cfg.high_t_weight_cap)
        lr = learning_rate(cfg, step, start_step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        log.append({"step": step, "loss": loss.item(), "lr": lr, "time": time.time()})
        if step % 50 == 0:
            rate = (step - start_step) * cfg.batch / (time.time() - t0)
            on_log(f"step {step} loss {sum(r['loss'] for r in log[-50:]) / len(log[-50:]):.4f} {rate:.1f} img/s")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(cfg, prior_cfg, model, ema, step, log)
        if step % cfg.grid_every == 0:
            ema_model = prior_cfg.unet()
            ema_model.load_state_dict(ema)
            write_sample_grid(ema_model.eval(), prior_cfg, encoder, out / "samples.png")
    _save(cfg, prior_cfg, model, ema, step, log)
    return out
