"""Runs of the app: a registry of optimisations, a FIFO queue with a bounded number running at
once, one background thread per running optimisation, ownership by browser (or API session), and a bounded number
of run folders on disk.

The request handlers of the web page only call the cheap methods here (submit, pause, refine, a
snapshot of the progress); the optimisation itself always runs in :meth:`RunManager._work_loop`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dreamfusion.config import USER_GUIDANCES, resolve_guidance, with_settings
from dreamfusion.export import to_uint8
from dreamfusion.files import atomic_write
from dreamfusion.runs import MESH_FORMATS, ExportOptions, export_scene, validate_export, write_run
from dreamfusion.trainer import TrainConfig, Trainer, validate_config, validate_prompt

#: limits of the settings a user may ask for from the page (the engine validates the rest)
MAX_STEPS = 20000
MAX_APP_RENDER_SIZE = 256
MAX_GUIDANCE_SCALE = 1000.0

ACTIVE = ("queued", "running", "paused")


class RunError(ValueError):
    """Something the user asked for that cannot be done: the message is shown as is."""


def _with_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """``cfg`` with ``{key: value}`` or ``{section: {key: value}}`` overrides, each a typed field
    (``dataclasses.replace``); an unknown key is a ``TypeError``."""
    changes = {}
    for key, value in (overrides or {}).items():
        current = getattr(cfg, key)
        changes[key] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **changes)


def return_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the system (glibc's malloc_trim; a
    no-op elsewhere). Without it a server whose runs each train on a pool thread keeps the freed
    heap of every thread's arena: measured here, 12 runs one after another in one process ended
    at 709 MB resident without and 600 MB with."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Run:
    id: str
    owner: str
    prompt: str
    cfg: TrainConfig
    folder: Path
    status: str = "queued"  # queued, running, paused, stopped, done, failed
    created: float = field(default_factory=time.time)
    trainer: Trainer | None = None
    message: str = ""
    losses: list = field(default_factory=list)  # (step, loss)
    preview: np.ndarray | None = None  # (H, W, 3) uint8
    step_times: deque = field(default_factory=lambda: deque(maxlen=30))
    step: int = 0
    total_steps: int = 0
    exports: dict = field(default_factory=dict)
    prompts: list = field(default_factory=list)  # (step, prompt) history: refinements
    export_count: int = 0
    #: set while a worker thread owns the run (between its start and its finish)
    working: bool = False
    cancelled: bool = False

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def its(self) -> float:
        """Iterations per second over the recent steps (wall clock, pauses excluded)."""
        times = list(self.step_times)
        if len(times) < 2:
            return 0.0
        span = times[-1] - times[0]
        return (len(times) - 1) / span if span > 0 else 0.0

    def eta(self) -> float | None:
        its = self.its()
        if its <= 0:
            return None
        return max(0, self.total_steps - self.step) / its


class RunManager:
    """All runs of this server. ``max_concurrent`` optimisations at once, the rest queue."""

    def __init__(self, runs_dir: str | Path, config_overrides: dict | None = None, max_concurrent: int = 1, max_runs_kept: int = 20,
                 threads: int = 1, checkpoint_every: int = 200, export_defaults: dict | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.base = _with_overrides(TrainConfig(preview_every=10), config_overrides or {})  # a bad override fails here
        self.max_concurrent = max(1, int(max_concurrent))
        self.max_runs_kept = max(1, int(max_runs_kept))
        self.threads = threads
        self.checkpoint_every = checkpoint_every
        self.export_defaults = dict(mesh_resolution=96, video="mp4", video_frames=24, video_size=128)
        self.export_defaults.update(export_defaults or {})
        self.runs: dict[str, Run] = {}
        self.queue: list[str] = []
        self.lock = threading.RLock()
        self.work = threading.Condition(self.lock)  # a queued run, or shutdown
        self.closing = False
        self.version = 0  # bumped whenever a run finishes (the gallery changes)
        # the gallery's thumbnails: written once each (atomically), never rewritten, and kept after
        # their run is pruned, so a page that listed one can always fetch it. Handing Gradio
        # arrays instead made it rewrite one cache file per image for every polling client at
        # once, and a client could receive a file another request had just truncated.
        self.gallery_dir = Path(tempfile.mkdtemp(prefix="dreamfusion-gallery-"))
        # a fixed pool of worker threads, reused run after run: a new thread per run would leave
        # glibc a new malloc arena each time, and memory would grow with the number of runs
        self.workers = [threading.Thread(target=self._work_loop, name=f"run-worker-{i}", daemon=True) for i in range(self.max_concurrent)]
        for w in self.workers:
            w.start()

    # ------------------------------------------------------------------ settings
    @staticmethod
    def guidance_choices() -> tuple[str, ...]:
        """The priors a visitor may pick (the registry's user-facing ones)."""
        return USER_GUIDANCES

    def defaults(self) -> dict:
        b = self.base
        guidance = resolve_guidance(b.guidance)
        return {"steps": b.steps, "seed": b.seed, "guidance_name": guidance.name, "guidance_model": guidance.model,
                "guidance_scale": guidance.guidance_scale, "render_size": b.render_size}

    def build_config(self, steps: int | None = None, seed: int | None = None, guidance_name: str | None = None, guidance_model: str | None = None,
                     guidance_scale: float | None = None, render_size: int | None = None) -> TrainConfig:
        """The server's base config with a visitor's settings, checked against the app's limits
        (the same builder as the command line: :func:`dreamfusion.config.with_settings`)."""
        try:
            steps = None if steps is None else int(steps)
            seed = None if seed is None else int(seed)
            render_size = None if render_size is None else int(render_size)
            guidance_scale = None if guidance_scale is None else float(guidance_scale)
        except (TypeError, ValueError) as exc:
            raise RunError(f"invalid setting: {exc}") from None
        if steps is not None and steps > MAX_STEPS:
            raise RunError(f"steps must be at most {MAX_STEPS}, got {steps}")
        if render_size is not None and render_size > MAX_APP_RENDER_SIZE:
            raise RunError(f"resolution must be at most {MAX_APP_RENDER_SIZE} pixels in the app, got {render_size}")
        if guidance_scale is not None and guidance_scale > MAX_GUIDANCE_SCALE:
            raise RunError(f"guidance weight must be at most {MAX_GUIDANCE_SCALE:g}, got {guidance_scale:g}")
        name = str(guidance_name) if guidance_name else None
        if name is not None and name not in USER_GUIDANCES:
            raise RunError(f"unknown guidance {name!r}; choose {' or '.join(USER_GUIDANCES)}")
        if seed is not None and not 0 <= seed < 2**63:
            raise RunError(f"seed must be between 0 and 2^63, got {seed}")
        model = None if guidance_model is None else str(guidance_model).strip()
        cfg = with_settings(self.base, steps=steps, seed=seed, guidance=name, model=model, guidance_scale=guidance_scale, render_size=render_size)
        cfg = dataclasses.replace(cfg, guidance=resolve_guidance(cfg.guidance))
        try:
            validate_config(cfg)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        return cfg

    def preload(self) -> str | None:
        """Load the default prior into the process's shared cache. Returns why it could not be
        loaded (None when it was): the page still starts, and a run reports the same error."""
        from dreamfusion.guidance import load_guidance

        try:
            load_guidance(self.base.guidance, self.base.device)
        except Exception as exc:  # noqa: BLE001 - e.g. a Stable Diffusion default without its weights
            return f"{type(exc).__name__}: {exc}"
        return None

    def vocabulary_note(self, cfg: TrainConfig, prompt: str) -> str | None:
        """The prior's note for a prompt far from what it knows (None for a known prompt, for a
        prior that knows the open world, or when the prior cannot be loaded: the run says why)."""
        from dreamfusion.guidance import load_guidance

        try:
            return load_guidance(cfg.guidance, cfg.device).vocabulary_note(prompt)
        except Exception:  # noqa: BLE001 - the run itself reports a prior that does not load
            return None

    def estimated_start(self, run: Run) -> float | None:
        """Seconds until a queued run starts, estimated from the runs ahead of it: their remaining
        steps at the speed of the running ones (None when not queued or nothing is measured yet)."""
        with self.lock:
            if run.id not in self.queue:
                return None
            running = [r for r in self.runs.values() if r.status in ("running", "paused")]
            rates = [r.its() for r in running if r.its() > 0]
            if not rates:
                return None
            rate = sum(rates) / len(rates)
            ahead = [self.runs[i] for i in self.queue[: self.queue.index(run.id)]]
            work = sorted(max(0, r.total_steps - r.step) for r in running)
            slots = [w / rate for w in work] + [0.0] * max(0, self.max_concurrent - len(work))
            for r in ahead:  # each run ahead takes the slot that frees first
                slots.sort()
                slots[0] += max(0, r.total_steps - r.step) / rate
            return min(slots) if slots else None

    # ------------------------------------------------------------------ queries
    def get(self, run_id: str) -> Run:
        with self.lock:
            if run_id not in self.runs:
                raise RunError(f"no run {run_id!r} on this server")
            return self.runs[run_id]

    def latest_of(self, owner: str) -> Run | None:
        with self.lock:
            mine = [r for r in self.runs.values() if r.owner == owner]
            return max(mine, key=lambda r: r.created) if mine else None

    def owned(self, owner: str, run_id: str | None = None) -> Run:
        """The caller's run (``run_id`` or their latest); a clear error if it is not theirs."""
        run_id = (run_id or "").strip()
        if run_id:
            run = self.get(run_id)
            if run.owner != owner:
                raise RunError(f"run {run_id} belongs to another session: you can only control your own runs")
            return run
        run = self.latest_of(owner)
        if run is None:
            raise RunError("you have no run yet: enter a prompt and press Generate first")
        return run

    def adopt(self, old_owner: str, new_owner: str) -> None:
        """Hand every run of ``old_owner`` to ``new_owner`` (a page's session to its browser)."""
        with self.lock:
            for r in self.runs.values():
                if r.owner == old_owner:
                    r.owner = new_owner

    def queue_position(self, run: Run) -> int | None:
        with self.lock:
            return self.queue.index(run.id) + 1 if run.id in self.queue else None

    def current(self) -> Run | None:
        """The most recently started run that has a scene (what the viewer shows by default)."""
        with self.lock:
            cands = [r for r in self.runs.values() if r.trainer is not None]
            act = [r for r in cands if r.status in ("running", "paused")]
            pool = act or cands
            return max(pool, key=lambda r: r.created) if pool else None

    def finished(self) -> list[dict]:
        """This server's finished runs on disk (newest first): what the gallery shows. Each entry
        carries its preview as the path of a thumbnail file of its own (``preview``), copied under
        the lock that pruning takes and never rewritten or deleted while it may still be listed:
        an entry can never point at a file that is gone or half-written."""
        out = []
        with self.lock:
            for meta_path in self.runs_dir.glob("*/run.json"):
                try:
                    meta = json.loads(meta_path.read_text())
                    if meta.get("status") not in ("done", "stopped", "failed"):
                        continue
                    meta["preview"] = str(self._thumbnail(meta_path.parent / "preview.png", f"{meta['id']}-{meta.get('step', 0)}"))
                except (OSError, ValueError, KeyError):
                    continue  # a run without a preview (or half-deleted) is not listed
                out.append(meta)
        return sorted(out, key=lambda m: m.get("created", 0), reverse=True)

    #: thumbnails kept on disk (the gallery shows 30; older ones go once this many are newer)
    GALLERY_FILES = 200

    def _thumbnail(self, preview: Path, key: str) -> Path:
        """The gallery's copy of a run's preview: written once under a temporary name and renamed
        into place, then left alone; the oldest beyond :data:`GALLERY_FILES` are removed."""
        if not preview.is_file():
            raise OSError(f"no preview: {preview}")  # the run lost it (pruned mid-listing): not listed
        target = self.gallery_dir / f"{key}.png"
        if not target.exists():
            atomic_write(target, lambda tmp: shutil.copyfile(preview, tmp))
            files = sorted(self.gallery_dir.glob("*.png"), key=lambda p: p.stat().st_mtime)
            for old in files[:-self.GALLERY_FILES]:
                old.unlink(missing_ok=True)
        return target

    # ------------------------------------------------------------------ actions
    def submit(self, owner: str, prompt: str, **settings) -> Run:
        try:
            prompt = validate_prompt(prompt)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        cfg = self.build_config(**settings)
        with self.lock:
            for r in self.runs.values():
                if r.owner == owner and r.active:
                    raise RunError(f"your run {r.id} is still {r.status}: stop it before generating another "
                                   "(or use Refine to change its prompt)")
            run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            run = Run(run_id, owner, prompt, cfg, self.runs_dir / run_id, total_steps=cfg.steps)
            run.prompts.append((0, prompt))
            run.folder.mkdir(parents=True)
            self.runs[run_id] = run
            self._write_meta(run)
            self._prune_disk()
            self._enqueue(run)
        return run

    def pause(self, owner: str, run_id: str | None = None) -> Run:
        run = self.owned(owner, run_id)
        with self.lock:
            if run.status != "running" or run.trainer is None:
                raise RunError(f"run {run.id} is {run.status}, not running: nothing to pause")
            run.trainer.pause()
            run.status = "paused"
        return run

    def resume(self, owner: str, run_id: str | None = None) -> Run:
        run = self.owned(owner, run_id)
        with self.lock:
            if run.status != "paused":
                raise RunError(f"run {run.id} is {run.status}, not paused: nothing to resume")
            run.status = "running"
            run.step_times.clear()
            run.trainer.resume()
        return run

    def stop(self, owner: str, run_id: str | None = None) -> Run:
        run = self.owned(owner, run_id)
        with self.lock:
            if not run.active:
                raise RunError(f"run {run.id} is already {run.status}")
            if run.status == "queued":
                self.queue.remove(run.id)
                run.status = "stopped"
                run.message = "stopped before it started" if run.trainer is None else "stopped"
                self._write_meta(run)
                return run
            if run.trainer is None:  # still being set up by its worker
                run.cancelled = True
            else:
                run.trainer.stop()  # the worker sees it after the current step and finishes the run
        return run

    def refine(self, owner: str, prompt: str, extra_steps: int = 0, run_id: str | None = None) -> Run:
        """Change the prompt of the caller's run and keep optimising the same scene (Figure 4).
        Everything is checked before anything changes: a rejected request changes nothing."""
        run = self.owned(owner, run_id)
        try:
            prompt = validate_prompt(prompt)
            extra_steps = int(extra_steps or 0)
        except (TypeError, ValueError) as exc:
            raise RunError(str(exc)) from None
        if extra_steps < 0 or extra_steps > MAX_STEPS:
            raise RunError(f"extra steps must be between 0 and {MAX_STEPS}, got {extra_steps}")
        with self.lock:
            if run.status == "queued" and run.trainer is None:
                run.prompt = prompt
                run.prompts.append((0, prompt))
                run.cfg = dataclasses.replace(run.cfg, steps=run.cfg.steps + extra_steps)
                run.total_steps = run.cfg.steps
                self._write_meta(run)
                return run
            trainer = run.trainer
            if trainer is None:
                raise RunError(f"run {run.id} has no scene to refine ({run.status})")
            if run.status == "failed":
                raise RunError(f"run {run.id} failed: {run.message}")
            finished = run.status in ("done", "stopped")
            if finished and trainer.step_count >= trainer.total_steps and not extra_steps:
                raise RunError(f"run {run.id} is {run.status}: give extra steps to keep optimising it with the new prompt")
            try:
                trainer.set_prompt(prompt)  # may take the shared prior again (a finished run is parked without it)
            except Exception as exc:  # noqa: BLE001 - e.g. the prior cannot take this prompt: nothing has changed
                raise RunError(f"cannot refine with {prompt!r}: {exc}") from None
            if extra_steps:
                trainer.extend(extra_steps)
            run.prompt = prompt
            run.total_steps = trainer.total_steps
            run.prompts.append((trainer.step_count, prompt))
            if finished:
                trainer.resume()
                self._enqueue(run)
            self._write_meta(run)
        return run

    def export(self, owner: str, formats: Sequence[str] | None = ("glb",), run_id: str | None = None, **opts) -> dict[str, Path]:
        """Export the current scene of the caller's run (running or finished)."""
        run = self.owned(owner, run_id)
        trainer = run.trainer
        if trainer is None:
            raise RunError(f"run {run.id} has no scene yet ({run.status}): wait until it starts")
        formats = [str(f).lower() for f in (formats or [])]
        if not formats:
            raise RunError("choose at least one export format")
        meshes = tuple(f for f in formats if f in MESH_FORMATS)
        video = "mp4" if ("video" in formats or "mp4" in formats) else "none"
        unknown = [f for f in formats if f not in MESH_FORMATS and f not in ("video", "mp4")]
        if unknown:
            raise RunError(f"unknown export format {unknown[0]!r}; choose from glb, obj, ply, video")
        kw = dict(self.export_defaults)
        kw.update(opts)
        kw["video"] = video if video == "none" else kw.get("video", "mp4")
        options = ExportOptions(formats=meshes, **kw)
        try:
            validate_export(options)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        with self.lock:
            run.export_count += 1
            folder = run.folder / f"export-{run.export_count:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            written = export_scene(trainer, folder, options)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the server keeps running
            raise RunError(f"export failed: {type(exc).__name__}: {exc}") from None
        with self.lock:
            run.exports = {k: Path(v) for k, v in written.items()}
        return run.exports

    # ------------------------------------------------------------------ machinery
    def _enqueue(self, run: Run) -> None:
        with self.lock:
            run.status = "queued"
            self.queue.append(run.id)
            self.work.notify()

    def _work_loop(self) -> None:
        """A worker thread: take the next queued run, optimise it until it is done or stopped,
        and again; one torch thread count for its whole life."""
        torch.set_num_threads(self.threads)
        while True:
            with self.lock:
                while not self.queue and not self.closing:
                    self.work.wait()
                if self.closing:
                    return
                run = self.runs[self.queue.pop(0)]
                run.status = "running"
                run.working = True
                run.step_times.clear()
            self._optimise(run)

    def _on_metrics(self, run: Run, m: dict) -> None:
        run.step = m["step"]
        run.total_steps = m["total_steps"]
        run.step_times.append(time.perf_counter())
        if np.isfinite(m["loss"]):
            run.losses.append((m["step"], float(m["loss"])))
        if "preview" in m:
            run.preview = to_uint8(m["preview"])
        if self.checkpoint_every and m["step"] % self.checkpoint_every == 0 and run.trainer is not None:
            run.trainer.save_checkpoint(run.folder / "checkpoint.safetensors")

    def _optimise(self, run: Run) -> None:
        """Drive one run with the Trainer's own controls (pause, stop and extend act on it
        directly); finish it under the manager's lock, so a Refine that extends the run either
        comes before the check (and is optimised here) or after the finish (and queues it again)."""
        try:
            trainer = run.trainer
            if trainer is None:
                trainer = Trainer(run.cfg, run.prompt, callbacks=[lambda m: self._on_metrics(run, m)],
                                  on_message=lambda msg: setattr(run, "message", msg))
                with self.lock:
                    run.trainer = trainer
                    run.total_steps = trainer.total_steps
                    if run.cancelled:  # Stop pressed while the scene and prior were being set up
                        trainer.stop()
                run.preview = to_uint8(trainer.preview())
            while True:
                trainer.run()
                with self.lock:
                    if trainer.stopped or trainer.done:
                        status = "stopped" if trainer.stopped and not trainer.done else "done"
                        self._finish(run, status, "")
                        return
        except Exception as exc:  # noqa: BLE001 - a crashed run keeps its checkpoint, the server keeps running
            traceback.print_exc()
            with self.lock:
                self._finish(run, "failed", f"{type(exc).__name__}: {exc}")

    def _finish(self, run: Run, status: str, message: str) -> None:
        """Write the run's folder (checkpoint, log, preview, and the default files: a GLB mesh and a
        turntable, so the result is there without an Export) with the one writer the command line
        uses, and let the run keep its scene but not its prior nor what only training needs
        (gradients, Adam's moments: back from the checkpoint if it is refined)."""
        trainer = run.trainer
        if trainer is not None:
            checkpoint = None
            try:
                written = write_run(trainer, run.folder, self.finish_export())
                run.exports = {k: Path(v) for k, v in written.items() if k in ("glb", "video")}
                checkpoint = written.get("checkpoint")
            except Exception as exc:  # noqa: BLE001
                message = (message + "; " if message else "") + f"could not save the run: {exc}"
            trainer.park(checkpoint)  # the scene stays; prior, gradients and Adam's moments go
            return_freed_memory()
        run.status = status
        run.working = False
        run.message = message or run.message
        self._write_meta(run)
        self.version += 1

    def finish_export(self) -> ExportOptions:
        """What a finished run writes without being asked: a GLB mesh and an MP4 turntable."""
        kw = dict(self.export_defaults)
        return ExportOptions(formats=("glb",), **{**kw, "video": kw.get("video", "mp4") if kw.get("video", "mp4") != "none" else "mp4"})

    def _write_meta(self, run: Run) -> None:
        meta = {"id": run.id, "prompt": run.prompt, "prompts": run.prompts, "status": run.status, "created": run.created,
                "step": run.step, "total_steps": run.total_steps, "message": run.message}
        try:
            (run.folder / "run.json").write_text(json.dumps(meta, indent=2))
        except OSError:
            pass

    def _prune_disk(self) -> None:
        """Keep at most ``max_runs_kept`` run folders: delete the oldest inactive ones."""
        folders = sorted((p for p in self.runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        active = {r.id for r in self.runs.values() if r.active or r.working}
        excess = len(folders) - self.max_runs_kept
        for p in folders:
            if excess <= 0:
                break
            if p.name in active:
                continue
            shutil.rmtree(p, ignore_errors=True)
            run = self.runs.get(p.name)
            if run is not None and not run.active:
                self.runs.pop(p.name, None)
            excess -= 1

    def shutdown(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.queue.clear()
            self.closing = True
            self.work.notify_all()
            runs = list(self.runs.values())
        for r in runs:
            if r.trainer is not None:
                r.trainer.stop()
        for w in self.workers:
            w.join(timeout)
        shutil.rmtree(self.gallery_dir, ignore_errors=True)
