"""The Trainer: owns the scene, the optimiser, the step count and the prompt, and runs
DreamFusion's loop one iteration at a time under a lock, so another thread (the app, a viewer)
can render, pause, refine the prompt or save while it trains."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cameras import CameraConfig, Cameras, Lights, default_light, make_cameras, sample_cameras, sample_lights, view_label
from .field import Background, FieldConfig, GridField
from .guidance import Guidance, GuidanceConfig, load_guidance
from .prior.data import SHADING_PROBS
from .render import RenderConfig, Renderer
from .sds import timestep_bounds
from .shading import TRAINING_SHADING_MODES

CHECKPOINT_VERSION = 1
MAX_RENDER_SIZE = 512
#: training cameras remembered for viewers (steps, each with ``views`` cameras)
CAMERA_HISTORY = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: corrupt, not ours, or from another version."""


@dataclass
class OptimConfig:
    """Adam on the grid, regularisers, and the guard against bad steps."""

    lr: float = 0.05
    lr_background: float = 1e-3
    grad_clip: float = 10.0
    orientation_weight: float = 0.01
    """final weight of the Ref-NeRF orientation loss (ramped up from 0)"""
    orientation_ramp: float = 0.5
    """fraction of the run over which the orientation weight ramps up"""
    opacity_weight: float = 50.0
    """weight of the mean-opacity (sparsity) regulariser against fog (the SDS gradient is summed
    over pixels and this mean is not, hence the size)"""


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
    field: FieldConfig = dataclass_field(default_factory=FieldConfig)
    render: RenderConfig = dataclass_field(default_factory=RenderConfig)
    guidance: GuidanceConfig = dataclass_field(default_factory=GuidanceConfig)
    optim: OptimConfig = dataclass_field(default_factory=OptimConfig)


def validate_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe an object, e.g. 'a red cube'")
    return " ".join(prompt.split())


def validate_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, each with one clear sentence."""
    if cfg.steps <= 0:
        raise ValueError(f"steps must be positive, got {cfg.steps}")
    if not 8 <= cfg.render_size <= MAX_RENDER_SIZE:
        raise ValueError(f"render size must be between 8 and {MAX_RENDER_SIZE} pixels, got {cfg.render_size}")
    if not 8 <= cfg.field.resolution <= 256:
        raise ValueError(f"grid resolution must be between 8 and 256, got {cfg.field.resolution}")
    if cfg.views <= 0 or cfg.views > 16:
        raise ValueError(f"views per step must be between 1 and 16, got {cfg.views}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} was asked for but this machine has no CUDA GPU; use --device cpu")
    if cfg.device not in ("cpu",) and not cfg.device.startswith("cuda") and cfg.device != "mps":
        raise ValueError(f"unknown device {cfg.device!r}; use cpu or cuda")
    g = cfg.guidance
    if not 0 <= g.t_min < g.t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got {g.t_min}, {g.t_max}")
    if g.guidance_scale < 0 or not math.isfinite(g.guidance_scale):
        raise ValueError(f"guidance scale must be a non-negative number, got {g.guidance_scale}")


def config_to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def config_from_dict(data: dict) -> TrainConfig:
    def tup(d: dict, *keys):
        for k in keys:
            if k in d and isinstance(d[k], list):
                d[k] = tuple(d[k])
        return d

    cam = tup(dict(data.get("camera", {})), *CameraConfig.__dataclass_fields__)
    top = {k: v for k, v in data.items() if k not in ("camera", "field", "render", "guidance", "optim")}
    return TrainConfig(**top, camera=CameraConfig(**cam), field=FieldConfig(**data.get("field", {})),
                       render=RenderConfig(**data.get("render", {})), guidance=GuidanceConfig(**data.get("guidance", {})),
                       optim=OptimConfig(**data.get("optim", {})))


class Trainer:
    """DreamFusion's optimisation, steppable and thread-safe.

    Progress goes to ``callbacks`` (each called with a dict of metrics after every step) and
    ``on_message`` (human-readable notes such as a skipped step), never to stdout."""

    def __init__(self, cfg: TrainConfig, prompt: str, guidance: Guidance | None = None,
                 callbacks: list[Callable[[dict], None]] | None = None, on_message: Callable[[str], None] | None = None):
        validate_config(cfg)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.lock = threading.RLock()
        self.callbacks = list(callbacks or [])
        self.on_message = on_message or (lambda msg: None)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.field = GridField(cfg.field).to(self.device)
        self.background = Background(cfg.field.background).to(self.device)
        self.renderer = Renderer(self.field, self.background, cfg.render).to(self.device)
        self.optimizer = self._make_optimizer()
        self.guidance = guidance if guidance is not None else load_guidance(cfg.guidance, self.device)
        self.step_count = 0
        self.total_steps = cfg.steps
        self.history: list[dict] = []
        self.recent_cameras: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=CAMERA_HISTORY)
        self.prompt = ""
        self.set_prompt(prompt)
        self._resume = threading.Event()
        self._resume.set()
        self._stop = threading.Event()
        self._last_time: float | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": [self.field.grid], "lr": self.cfg.optim.lr}]
        bg = list(self.background.parameters())
        if bg:
            groups.append({"params": bg, "lr": self.cfg.optim.lr_background})
        return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)

    # ------------------------------------------------------------------ control
    def set_prompt(self, prompt: str) -> None:
        """Change the prompt; optimisation continues from the current scene (Figure 4)."""
        prompt = validate_prompt(prompt)
        note = self.guidance.truncation_note(f"{prompt}, overhead view")
        if note:
            self.on_message(note)
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

    # ------------------------------------------------------------------ the loop
    def _sample_mode(self) -> str:
        idx = torch.multinomial(torch.tensor(SHADING_PROBS), 1, generator=self.generator).item()
        return TRAINING_SHADING_MODES[idx]

    def _update_occupancy(self) -> None:
        """Refresh the occupancy grid when due. nerfacc's update draws from torch's global RNG;
        it runs here under a seed drawn from the trainer's own generator, so a run is
        reproducible (and resumes exactly) whatever else uses the global RNG."""
        if self.step_count % self.cfg.render.occupancy_update_every != 0:
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.renderer.update_occupancy(self.step_count)

    def orientation_weight(self) -> float:
        ramp = max(1.0, self.cfg.optim.orientation_ramp * self.total_steps)
        return self.cfg.optim.orientation_weight * min(1.0, self.step_count / ramp)

    def step(self) -> dict:
        """One DreamFusion iteration. Returns its metrics (also sent to the callbacks)."""
        with self.lock:
            t0 = time.perf_counter()
            cfg = self.cfg
            self.field.train()
            cams = sample_cameras(cfg.camera, cfg.views, self.generator)
            self.recent_cameras.append((cams.c2w.clone(), cams.focal.clone()))
            cams = cams.to(self.device)
            lights = sample_lights(cfg.camera, cams.to("cpu"), self.generator).to(self.device)
            mode = self._sample_mode()
            out = self.renderer.render(cams, lights, cfg.render_size, cfg.render_size, mode, stratified=True, generator=self.generator)
            texts = [f"{self.prompt}, {view_label(float(a), float(e))}" for a, e in zip(cams.azimuth, cams.elevation)]
            t_range = timestep_bounds(self.step_count, self.total_steps, cfg.guidance.t_min, cfg.guidance.t_max, cfg.guidance.t_max_end)
            sds = self.guidance.sds_loss(out["image"], texts, t_range, self.generator)
            orientation = out["orientation"].mean()
            opacity = out["opacity"].mean()
            loss = sds["loss"] + self.orientation_weight() * orientation + cfg.optim.opacity_weight * opacity
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in params)
            if finite:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                self.optimizer.step()
            else:
                self.on_message(f"step {self.step_count}: non-finite loss or gradient, update skipped")
            self.step_count += 1
            self._update_occupancy()
            now = time.perf_counter()
            metrics = {
                "step": self.step_count, "total_steps": self.total_steps, "loss": float(sds["loss"].detach()), "orientation": float(orientation.detach()),
                "opacity": float(opacity.detach()), "mode": mode, "t_max": t_range[1], "prompt": self.prompt, "skipped": not finite,
                "seconds": now - t0, "samples": out["n_samples"], "occupancy": self.renderer.occupancy_fraction(),
            }
            if cfg.preview_every and (self.step_count % cfg.preview_every == 0 or self.step_count == self.total_steps):
                metrics["preview"] = self.preview()
            self.history.append({k: v for k, v in metrics.items() if k != "preview"})
        for cb in self.callbacks:
            cb(metrics)
        return metrics

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
            if into is None:
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
        return self.render_views(make_cameras(30.0, 20.0, 1.9, 1.1), size=size)[0]

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        with self.lock:
            tensors = {"field.grid": self.field.grid.detach().cpu()}
            for k, v in self.background.state_dict().items():
                tensors[f"background.{k}"] = v.cpu()
            tensors["occupancy.occs"] = self.renderer.estimator.occs.cpu()
            tensors["occupancy.binaries"] = self.renderer.estimator.binaries.cpu().to(torch.uint8)
            for gi, group in enumerate(self.optimizer.param_groups):
                for pi, p in enumerate(group["params"]):
                    for k, v in self.optimizer.state.get(p, {}).items():
                        tensors[f"optim.{gi}.{pi}.{k}"] = torch.as_tensor(v).detach().cpu().reshape(-1) if k == "step" else v.detach().cpu()
            tensors["rng"] = self.generator.get_state()
            return tensors

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the whole run (scene, occupancy, optimiser, RNG, prompt, config) as safetensors,
        atomically: a crash mid-write leaves the previous file intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            meta = {"format": "dreamfusion", "version": str(CHECKPOINT_VERSION), "prompt": self.prompt, "step": str(self.step_count),
                    "total_steps": str(self.total_steps), "config": json.dumps(config_to_dict(self.cfg))}
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.contiguous() for k, v in self.state_tensors().items()}, str(tmp), metadata=meta)
            tmp.replace(path)
        return path

    @staticmethod
    def read_checkpoint(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}); was it truncated or overwritten?") from None
        if meta.get("format") != "dreamfusion":
            raise CheckpointError(f"{path} is a safetensors file but not a dreamfusion checkpoint")
        if meta.get("version") != str(CHECKPOINT_VERSION):
            raise CheckpointError(f"{path} is a checkpoint of format version {meta.get('version')}; this dreamfusion reads version {CHECKPOINT_VERSION}")
        missing = [k for k in ("prompt", "step", "total_steps", "config") if k not in meta]
        if missing:
            raise CheckpointError(f"{path} is an incomplete checkpoint: its metadata lacks {', '.join(missing)}")
        try:
            int(meta["step"]), int(meta["total_steps"])
            if not isinstance(json.loads(meta["config"]), dict):
                raise ValueError("config is not a JSON object")
        except ValueError as exc:
            raise CheckpointError(f"{path} has corrupt metadata ({exc})") from None
        return meta, tensors

    @classmethod
    def from_checkpoint(cls, path: str | Path, guidance: Guidance | None = None, overrides: dict | None = None, **kwargs) -> "Trainer":
        """Rebuild a run from a checkpoint and continue exactly where it stopped."""
        meta, tensors = cls.read_checkpoint(path)
        data = json.loads(meta["config"])
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
        try:
            cfg = config_from_dict(data)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} holds a configuration this dreamfusion cannot read ({exc})") from None
        trainer = cls(cfg, meta["prompt"], guidance=guidance, **kwargs)
        trainer.load_state(meta, tensors)
        return trainer

    def load_state(self, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        with self.lock:
            try:
                self.field.grid.data.copy_(tensors["field.grid"])
                self.background.load_state_dict({k[len("background."):]: v for k, v in tensors.items() if k.startswith("background.")})
                self.renderer.estimator.occs.copy_(tensors["occupancy.occs"])
                self.renderer.estimator.binaries.copy_(tensors["occupancy.binaries"].bool())
            except (KeyError, RuntimeError) as exc:
                raise CheckpointError(f"checkpoint does not match this configuration: {exc}") from None
            for gi, group in enumerate(self.optimizer.param_groups):
                for pi, p in enumerate(group["params"]):
                    state = {}
                    for k in ("step", "exp_avg", "exp_avg_sq"):
                        key = f"optim.{gi}.{pi}.{k}"
                        if key in tensors:
                            state[k] = tensors[key].reshape(()) if k == "step" else tensors[key].to(self.device)
                    if state:
                        self.optimizer.state[p] = state
            if "rng" in tensors:
                self.generator.set_state(tensors["rng"])
            self.step_count = int(meta["step"])
            self.total_steps = max(int(meta["total_steps"]), self.cfg.steps)
            self.prompt = meta["prompt"]
