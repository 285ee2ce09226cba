"""The Trainer: owns the scene, the optimiser, the step count and the prompt, and runs
DreamFusion's loop one iteration at a time under a lock, so another thread (the app, a viewer)
can render, pause, refine the prompt or save while it trains.

One iteration: draw cameras, lights and a shading mode from the prior's own distribution, render,
hand the renders and their conditions to the guidance (:meth:`Guidance.loss`: SDS, or the
reference's photometric loss), add the named regularisers of :mod:`dreamfusion.losses`, step Adam.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import record_function

from .adam import GridAdam
from .cameras import VIEW_DISTANCE, VIEW_FOCAL, Cameras, Lights, default_light, make_cameras, sample_cameras, sample_lights, view_label
from .checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    build_scene,
    checkpoint_config,
    load_scene_tensors,
    read_checkpoint,
    scene_tensors,
    write_checkpoint,
)
from .config import (
    MAX_RENDER_SIZE,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    resolve_guidance,
    validate_config,
    validate_prompt,
)
from .field import grid_resolution
from .guidance import Guidance, RenderBatch, load_guidance
from .losses import loss_terms
from .render import Renderer
from .sds import timestep_bounds
from .shading import TRAINING_SHADING_MODES

#: training cameras remembered for viewers (steps, each with ``views`` cameras)
CAMERA_HISTORY = 8

__all__ = ["CAMERA_HISTORY", "CHECKPOINT_VERSION", "MAX_RENDER_SIZE", "CheckpointError", "OptimConfig", "TrainConfig", "Trainer",
           "config_from_dict", "config_to_dict", "lr_factor", "validate_config", "validate_prompt"]


def graded_texts(prompt: str) -> list[str]:
    """Every text SDS grades a prompt's renders with: the prompt with each view label, and the empty
    text of guidance's unconditional branch."""
    labels = dict.fromkeys(view_label(az, el) for az, el in ((0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (0.0, 90.0)))
    return [f"{prompt}, {label}" for label in labels] + [""]


def blob_scale(step: int, total_steps: int, fade_fraction: float, min_steps: int) -> float:
    """Strength of the initial blob's inside at ``step``: 1 at the start, falling linearly to 0 over
    ``fade_fraction`` of the run, or over ``min_steps`` where that is longer."""
    span = max(float(min_steps), fade_fraction * total_steps)
    return max(0.0, 1.0 - step / span) if span > 0 else 1.0


def lr_factor(fraction_done: float, decay_start: float, final_factor: float) -> float:
    """Learning-rate multiplier: 1 until ``decay_start`` (a fraction of the run), then exponential
    decay to ``final_factor`` at the end."""
    if decay_start >= 1 or fraction_done <= decay_start:
        return 1.0
    span = (min(fraction_done, 1.0) - decay_start) / (1.0 - decay_start)
    return final_factor ** span


class Trainer:
    """DreamFusion's optimisation, steppable and thread-safe.

    Progress goes to ``callbacks`` (each called with a dict of metrics after every step) and
    ``on_message`` (human-readable notes such as a skipped step), never to stdout.

    Random draws, one rule on every device: every draw of a run (cameras, lights, shading mode,
    backgrounds, stratified samples, SDS timesteps and noise, the occupancy update's cells) is made
    on the CPU from the trainer's own CPU generator, seeded by ``cfg.seed``, and moved to the
    device afterwards. A seed thus makes the same draws on a CPU and on a GPU (the runs then differ
    only by float rounding), a checkpoint's generator state resumes on either, and torch's global
    generators are never touched."""

    def __init__(self, cfg: TrainConfig, prompt: str, guidance: Guidance | None = None,
                 callbacks: list[Callable[[dict], None]] | None = None, on_message: Callable[[str], None] | None = None):
        validate_config(cfg)
        cfg = dataclasses.replace(cfg, guidance=resolve_guidance(cfg.guidance))  # the prior's own defaults, recorded
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.lock = threading.RLock()
        self.callbacks = list(callbacks or [])
        self.on_message = on_message or (lambda msg: None)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):  # a learned background's initial weights, from the seed, made on the CPU
            torch.default_generator.manual_seed(cfg.seed)  # the CPU's only: torch.manual_seed would also reseed CUDA's
            self.renderer: Renderer = build_scene(cfg, self.device)
        self.field = self.renderer.field
        self.background = self.renderer.background
        self.guidance: Guidance | None = guidance if guidance is not None else load_guidance(cfg.guidance, self.device)
        prior_camera = self.guidance.camera_config() if cfg.camera_from_prior else None
        self.camera_cfg = prior_camera or cfg.camera
        self.terms = loss_terms(cfg.optim, signed_distance=cfg.field.sdf_fraction > 0)
        self.optimizer = self._make_optimizer()
        self.step_count = 0
        self.total_steps = cfg.steps
        self.history: list[dict] = []
        self.recent_cameras: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=CAMERA_HISTORY)
        self.prompt = ""
        self.set_prompt(prompt)
        self._resume = threading.Event()
        self._resume.set()
        self._stop = threading.Event()
        self._parked_at: Path | None = None  # where Adam's moments wait while the run is parked

    def _make_optimizer(self) -> GridAdam:
        o = self.cfg.optim
        if self.field.is_sdf:
            density = {"params": [self.field.density_grid], "lr": o.lr_sdf, "base_lr": o.lr_sdf, "eps": o.sdf_adam_eps}
        else:
            density = {"params": [self.field.density_grid], "lr": o.lr_density or o.lr, "base_lr": o.lr_density or o.lr}
        groups = [density,
                  {"params": [self.field.albedo_grid], "lr": o.lr, "base_lr": o.lr}]
        bg = list(self.background.parameters())
        if bg:
            groups.append({"params": bg, "lr": o.lr_background, "base_lr": o.lr_background})
        # torch's Adam(foreach=True), bit for bit, without the 1.1-1.5 s import of torch._dynamo it costs (dreamfusion/adam.py)
        return GridAdam(groups, betas=(0.9, 0.99), eps=1e-15)

    # ------------------------------------------------------------------ control
    def set_prompt(self, prompt: str) -> None:
        """Change the prompt; optimisation continues from the current scene (Figure 4)."""
        prompt = validate_prompt(prompt)
        guidance = self._require_guidance()
        guidance.check_prompt(prompt)
        note = guidance.truncation_note(f"{prompt}, overhead view")
        if note:
            self.on_message(note)
        guidance.prepare(graded_texts(prompt))  # a prior's text encoder is needed once per prompt, not during steps
        with self.lock:
            self.prompt = prompt

    def extend(self, steps: int) -> None:
        """Add iterations to the run (after a refinement, say)."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        with self.lock:
            self.total_steps += steps
        self._stop.clear()  # new work: a stopped run may continue

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    def stop(self) -> None:
        """End :meth:`run` after the current step (also if it has not started yet)."""
        self._stop.set()
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def done(self) -> bool:
        return self.step_count >= self.total_steps

    def run(self, steps: int | None = None) -> None:
        """Iterate until the run is complete, ``steps`` more iterations are done, or :meth:`stop`;
        blocks while paused."""
        target = self.total_steps if steps is None else min(self.total_steps, self.step_count + steps)
        while self.step_count < target and not self._stop.is_set():
            self._resume.wait()
            if self._stop.is_set():
                break
            self.step()

    # ------------------------------------------------------------------ the prior
    def park(self, checkpoint: str | Path | None = None) -> None:
        """A finished run keeps its scene, not what only training needs: drop the prior's
        reference, the gradients and Adam's moments (two copies of the grids). Adam's moments
        come back from ``checkpoint`` (this run's, just written at this step) when training
        resumes; without it, or if the file no longer holds this step, Adam restarts."""
        with self.lock:
            self.guidance = None
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.optimizer.state.clear()
            self._parked_at = Path(checkpoint) if checkpoint is not None else None

    def _parked_optimiser(self) -> dict[str, torch.Tensor] | None:
        """Adam's moments of a parked run, read back from its checkpoint (None: not parked)."""
        if self._parked_at is None:
            return None
        try:
            meta, tensors = read_checkpoint(self._parked_at)
            if int(meta["step"]) != self.step_count:
                raise ValueError(f"it holds step {meta['step']}, the run is at {self.step_count}")
        except Exception as exc:  # noqa: BLE001 - the scene is whole; only Adam's memory is lost
            self.on_message(f"optimiser restarted: its state could not be read back from {self._parked_at} ({exc})")
            return {}
        return {k: v for k, v in tensors.items() if k.startswith("optim.")}

    def _unpark(self) -> None:
        tensors = self._parked_optimiser()
        self._parked_at = None
        if tensors:
            self._load_optimiser_state(tensors)

    def attach_guidance(self, guidance: Guidance | None = None) -> Guidance:
        with self.lock:
            if guidance is not None:
                self.guidance = guidance
            return self._require_guidance()

    def _require_guidance(self) -> Guidance:
        if self.guidance is None:
            self.guidance = load_guidance(self.cfg.guidance, self.device)
        return self.guidance

    # ------------------------------------------------------------------ the loop
    def _sample_mode(self) -> str:
        idx = torch.multinomial(torch.tensor(self.cfg.shading_probs, dtype=torch.float32), 1, generator=self.generator).item()
        return TRAINING_SHADING_MODES[idx]

    def _update_occupancy(self) -> None:
        """Refresh the occupancy grid when due, its draws from a CPU generator seeded by a draw
        from the trainer's own (so a run is reproducible, and resumes exactly, on any device)."""
        # also after the first step: until the first update every cell counts as occupied, and the
        # dense marching of the steps before it costs several times a normal step
        if self.step_count % self.cfg.render.occupancy_update_every != 0 and self.step_count != 1:
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        self.renderer.update_occupancy(self.step_count, force=True, generator=torch.Generator().manual_seed(seed))

    def _grow_grid(self) -> None:
        """Coarse-to-fine: move the grid to the resolution this point of the run asks for (a new
        optimiser over the resampled grids: Adam's moments do not carry over a resampling)."""
        target = grid_resolution(self.cfg.field, self.fraction_done())
        if target > self.field.resolution:
            self.field.grow(target)
            self.optimizer = self._make_optimizer()

    def sdf_start_step(self) -> int | None:
        """The step at which the grid becomes a signed distance (None: never)."""
        f = self.cfg.field.sdf_fraction
        return None if f <= 0 else round((1.0 - f) * self.total_steps)

    def _signed_distance(self) -> None:
        """At its step, the density becomes a signed distance grid of its surface (Adam starts over on
        it: its values, and their rate, are of another kind); then the Laplace scale's schedule. A
        scene with nothing solid at that step stays a density (said once): the decision is taken at
        that step only, so a resumed run takes the same one."""
        start = self.sdf_start_step()
        if start is None or self.step_count < start:
            return
        f = self.cfg.field
        if not self.field.is_sdf:
            if self.step_count != start:
                return
            try:
                level = self.renderer.surface_level()
            except ValueError:
                self.on_message(f"step {self.step_count}: nothing solid to turn into a signed distance; the grid stays a density")
                return
            self.field.to_sdf(level, f.sdf_beta_start)
            kept = {p: state for p, state in self.optimizer.state.items() if p is not self.field.density_grid}
            self.optimizer = self._make_optimizer()
            self.optimizer.state.update(kept)  # the albedo's (and background's) moments carry over
        phase = min(1.0, 2.0 * (self.step_count - start) / max(1, self.total_steps - start))
        # never back up: a run extended (Refine) moves its start, not the scale it reached
        self.field.sdf_beta.fill_(min(float(self.field.sdf_beta), f.sdf_beta_start * (f.sdf_beta / f.sdf_beta_start) ** phase))

    def fraction_done(self) -> float:
        return self.step_count / max(1, self.total_steps)

    def _set_learning_rates(self) -> None:
        o = self.cfg.optim
        factor = lr_factor(self.fraction_done(), o.lr_decay_start, o.lr_final_factor)
        for group in self.optimizer.param_groups[:2]:  # the grids; the background keeps its rate
            group["lr"] = group["base_lr"] * factor

    def orientation_weight(self) -> float:
        term = next((t for t in self.terms if t.name == "orientation"), None)
        return term.weight(self.fraction_done()) if term else 0.0

    def step(self) -> dict:
        """One DreamFusion iteration. Returns its metrics (also sent to the callbacks)."""
        with self.lock:
            t0 = time.perf_counter()
            cfg = self.cfg
            guidance = self._require_guidance()
            self._unpark()
            self._grow_grid()
            if cfg.field.blob_fade_steps > 0:
                scale = blob_scale(self.step_count, self.total_steps, cfg.field.blob_fade_fraction, cfg.field.blob_fade_steps)
                # never back up: a run extended (Refine) keeps the blob it had already lost
                self.field.blob_scale.fill_(min(float(self.field.blob_scale), scale))
            self._signed_distance()
            self.field.train()
            cams = sample_cameras(self.camera_cfg, cfg.views, self.generator)
            self.recent_cameras.append((cams.c2w.clone(), cams.focal.clone()))
            lights = sample_lights(self.camera_cfg, cams, self.generator)
            mode = self._sample_mode()
            cams_d, lights_d = cams.to(self.device), lights.to(self.device)
            backgrounds = guidance.backgrounds(len(cams), self.generator)  # None: the scene's own
            with record_function("step.render"):
                out = self.renderer.render(cams_d, lights_d, cfg.render_size, cfg.render_size, mode, stratified=True, generator=self.generator,
                                           background=None if backgrounds is None else backgrounds.to(self.device))
            renders = RenderBatch(out["image"], out["opacity"], cams_d, lights_d, [mode] * len(cams))
            texts = [f"{self.prompt}, {view_label(float(a), float(e))}" for a, e in zip(cams.azimuth, cams.elevation, strict=True)]
            t_range = timestep_bounds(self.step_count, self.total_steps, cfg.guidance.t_min, cfg.guidance.t_max, cfg.guidance.t_max_end,
                                      cfg.guidance.t_min_start)
            with record_function("step.guidance"):
                graded = guidance.loss(renders, texts, t_range, self.generator)
            frac = self.fraction_done()
            values = {"guidance": graded["loss"]}
            weights = {"guidance": 1.0}
            for term in self.terms:
                values[term.name] = term.value(out, self.field)
                weights[term.name] = term.weight(frac)
            loss = sum(weights[k] * v for k, v in values.items())
            every = cfg.optim.grad_norm_every
            grad_norms = self._term_grad_norms(values, weights) if every and self.step_count % every == 0 else {}
            self._set_learning_rates()
            self.optimizer.zero_grad(set_to_none=True)
            with record_function("step.backward"):
                loss.backward()
            with record_function("step.optimiser"):
                params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                # the clipping's total norm is the finite check (one pass over the grids, not two): it is NaN or
                # infinite when a gradient is, or when the gradients are so large their squares overflow (skipped too)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
                if finite:
                    self.optimizer.step()
                else:
                    self.on_message(f"step {self.step_count}: non-finite loss or gradient, update skipped")
            self.step_count += 1
            self._update_occupancy()
            now = time.perf_counter()
            metrics = {
                "step": self.step_count, "total_steps": self.total_steps, "loss": float(graded["loss"].detach()),
                **{k: float(v.detach()) for k, v in values.items() if k != "guidance"},
                "mode": mode, "t_max": t_range[1], "prompt": self.prompt, "skipped": not finite,
                "seconds": now - t0, "samples": out["n_samples"], "occupancy": self.renderer.occupancy_fraction(),
            }
            if grad_norms:
                metrics["grad_norms"] = grad_norms
            if cfg.preview_every and (self.step_count % cfg.preview_every == 0 or self.step_count == self.total_steps):
                metrics["preview"] = self.preview()
            self.history.append({k: v for k, v in metrics.items() if k != "preview"})
        for cb in self.callbacks:
            cb(metrics)
        return metrics

    def _term_grad_norms(self, values: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, dict[str, float]]:
        """Norm of each weighted term's gradient on the density and the albedo grid (one backward
        per term: only every ``grad_norm_every`` steps)."""
        params = [self.field.density_grid, self.field.albedo_grid]
        norms = {}
        for name, value in values.items():
            if not value.requires_grad:
                continue
            grads = torch.autograd.grad(weights[name] * value, params, retain_graph=True, allow_unused=True)
            norms[name] = {p: 0.0 if g is None else float(g.norm()) for p, g in zip(("density", "albedo"), grads, strict=True)}
        return norms

    # ------------------------------------------------------------------ viewing
    def training_cameras(self) -> list[tuple[torch.Tensor, float]]:
        """The cameras of the last :data:`CAMERA_HISTORY` steps, newest last: (c2w (3, 4) on the
        CPU, focal as a multiple of the image width) each."""
        with self.lock:
            steps = list(self.recent_cameras)
        return [(c2w[i], float(focal[i])) for c2w, focal in steps for i in range(c2w.shape[0])]

    @torch.no_grad()
    def snapshot(self, into: Renderer | None = None) -> Renderer:
        """A copy of the current scene (field, background, occupancy grid) to render or export
        from while training goes on: taken under the lock (a copy of the grid), so everything
        made from it shows one step of the run. ``into``: an earlier snapshot to refresh in place."""
        with self.lock:
            if into is None or into.field.resolution != self.field.resolution:
                return copy.deepcopy(self.renderer)
            into.load_state_dict(self.renderer.state_dict())
            return into

    @torch.no_grad()
    def render_views(self, cameras: Cameras, lights: Lights | None = None, size: int = 64, mode: str = "lit",
                     scene: Renderer | None = None) -> torch.Tensor:
        """Images (B, 3, size, size) in [0, 1] of the current scene (or of ``scene``, a
        :meth:`snapshot`), without touching training."""
        lights = lights if lights is not None else default_light(cameras)
        with self.lock if scene is None else contextlib.nullcontext():
            out = (scene or self.renderer).render(cameras.to(self.device), lights.to(self.device), size, size, mode)
            return out["image"].clamp(0, 1).cpu()

    def preview(self, size: int = 64) -> torch.Tensor:
        """Front three-quarter view, lit: (3, size, size)."""
        return self.render_views(make_cameras(30.0, 20.0, VIEW_DISTANCE, VIEW_FOCAL), size=size)[0]

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        with self.lock:
            tensors = scene_tensors(self.renderer)
            for gi, group in enumerate(self.optimizer.param_groups):
                for pi, p in enumerate(group["params"]):
                    for k, v in self.optimizer.state.get(p, {}).items():
                        tensors[f"optim.{gi}.{pi}.{k}"] = torch.as_tensor(v).detach().cpu().reshape(-1) if k == "step" else v.detach().cpu()
            tensors.update(self._parked_optimiser() or {})  # a parked run's, from its checkpoint
            tensors["rng"] = self.generator.get_state()
            return tensors

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the whole run (scene, occupancy, optimiser, RNG, prompt, config) as safetensors,
        atomically: a crash mid-write leaves the previous file intact."""
        with self.lock:
            return write_checkpoint(path, self.state_tensors(), self.prompt, self.step_count, self.total_steps, self.cfg)

    read_checkpoint = staticmethod(read_checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | Path, guidance: Guidance | None = None, overrides: dict | None = None, **kwargs) -> Trainer:
        """Rebuild a run from a checkpoint and continue exactly where it stopped."""
        meta, tensors = read_checkpoint(path)
        cfg = checkpoint_config(path, meta, overrides)
        trainer = cls(cfg, meta["prompt"], guidance=guidance, **kwargs)
        trainer.load_state(meta, tensors)
        return trainer

    def _load_optimiser_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Adam's moments from checkpoint tensors (those that match the current grids)."""
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                state = {}
                for k in ("step", "exp_avg", "exp_avg_sq"):
                    key = f"optim.{gi}.{pi}.{k}"
                    if key in tensors and (k == "step" or tensors[key].shape == p.shape):
                        state[k] = tensors[key].reshape(()) if k == "step" else tensors[key].to(self.device)
                if len(state) == 3:
                    self.optimizer.state[p] = state

    def load_state(self, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        with self.lock:
            grown = "field.density" in tensors and tensors["field.density"].shape != self.field.density_grid.shape
            load_scene_tensors(self.renderer, {k: v.to(self.device) for k, v in tensors.items()})
            if grown or self.field.is_sdf:  # new parameters, or a signed distance grid's own rate: a fresh optimiser
                self.optimizer = self._make_optimizer()
            self._parked_at = None  # the loaded state replaces whatever a parked run would read back
            self._load_optimiser_state(tensors)
            if "rng" in tensors:
                self.generator.set_state(tensors["rng"])
            self.step_count = int(meta["step"])
            self.total_steps = max(int(meta["total_steps"]), self.cfg.steps)
            self.prompt = meta["prompt"]

