"""Runs of the app: a registry of optimisations, a bounded FIFO queue, a pool of worker processes
that train them (:mod:`app.worker`), ownership by browser (or API session), and a bounded number
of run folders on disk.

The page's process only keeps the books here: the request handlers call the cheap methods (submit,
pause, refine, a snapshot of the progress), and the events of the workers update the runs. No
optimisation, export or prior runs in this process, and no method waits for a worker while it holds
the manager's lock, so a poll never waits for a run to finish.

Faults stay in their run: a worker that dies (killed, out of memory, a crash in native code) fails
its run with a message, keeps its last checkpoint, and is replaced; a run whose owner stopped
polling for ``abandon_after`` seconds is stopped (and keeps its checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dreamfusion.config import USER_GUIDANCES, ExportOptions, TrainConfig, config_to_dict, resolve_guidance, validate_config, with_settings
from dreamfusion.files import atomic_write

from .worker import WorkerError, WorkerHandle, job_payload

#: limits of the settings a user may ask for from the page (the engine validates the rest)
MAX_STEPS = 20000
MAX_APP_RENDER_SIZE = 256
MAX_GUIDANCE_SCALE = 1000.0
#: what a visitor of a public server may ask for at most
PUBLIC_MAX_RENDER_SIZE = 128
PUBLIC_TURNTABLE_SIZE = 128

ACTIVE = ("queued", "running", "paused")
FINISHED = ("done", "stopped", "failed")
MESH_FORMATS = ("glb", "obj", "ply")


class RunError(ValueError):
    """Something the user asked for that cannot be done: the message is shown as is (as text)."""


#: the longest prompt the page takes (a prior reads far less: the embedded one 24 tokens)
MAX_PROMPT_CHARS = 500


def validate_prompt(prompt: object) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise RunError("the prompt is empty: describe an object, e.g. 'a red cube'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RunError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    return " ".join(prompt.split())


def default_workers(threads: int = 1, cpus: int | None = None) -> int:
    """Runs trained at once by default: as many as the machine's cores hold at ``threads`` each
    (two on two cores), at most four (each worker holds its own copy of the prior)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(4, cpus // max(1, threads)))


def _with_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """``cfg`` with ``{key: value}`` or ``{section: {key: value}}`` overrides, each a typed field
    (``dataclasses.replace``); an unknown key is a ``TypeError``."""
    changes = {}
    for key, value in (overrides or {}).items():
        current = getattr(cfg, key)
        changes[key] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **changes)


@dataclass
class Run:
    id: str
    owner: str
    prompt: str
    cfg: TrainConfig
    folder: Path
    status: str = "queued"  # queued, running, paused, stopped, done, failed
    created: float = field(default_factory=time.time)
    message: str = ""
    losses: list = field(default_factory=list)  # (step, loss)
    preview: np.ndarray | None = None  # (H, W, 3) uint8
    preview_step: int = -1  # the step the preview shows
    step_times: deque = field(default_factory=lambda: deque(maxlen=30))
    step: int = 0
    total_steps: int = 0
    exports: dict = field(default_factory=dict)
    prompts: list = field(default_factory=list)  # (step, prompt) history: refinements
    export_count: int = 0
    worker: WorkerHandle | None = None
    started: bool = False  # a worker has built its scene (it has something to show)
    finishing: bool = False  # training is over, its files are being written
    stop_requested: float | None = None
    checkpoint_step: int = 0  # the step of the checkpoint on disk (0: none yet)
    resume: dict | None = None  # a finished run refined: continue from its checkpoint with this
    snapshot: tuple[int, dict] | None = None  # (step, scene tensors) last sent by the worker, for the viewer
    snapshot_asked: float = 0.0
    cameras: list = field(default_factory=list)  # the latest training cameras: (c2w (3, 4), focal) each

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.safetensors"

    def its(self) -> float:
        """Iterations per second over the recent steps (pauses excluded)."""
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
    """All runs of this server: ``max_concurrent`` worker processes train one run each, the others
    wait in a queue of at most ``max_queue`` runs.

    ``public``: a server for strangers (a Space): a visitor picks a prior from the operator's
    ``models`` ({guidance name: model folder or hub id, '' for its default}), never a free path,
    and asks for at most ``max_steps`` steps."""

    #: thumbnails kept on disk (the gallery shows 30; older ones go once this many are newer)
    GALLERY_FILES = 200

    def __init__(self, runs_dir: str | Path, config_overrides: dict | None = None, max_concurrent: int | None = None, max_runs_kept: int = 20,
                 threads: int = 1, checkpoint_every: int = 100, export_defaults: dict | None = None, max_queue: int | None = 20,
                 public: bool = False, models: dict[str, str] | None = None, abandon_after: float = 120.0, max_steps: int = MAX_STEPS,
                 worker_nice: int = 0, preload: bool = True, stop_grace: float = 1.0, checkpoint_seconds: float = 30.0):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.base = _with_overrides(TrainConfig(preview_every=10), config_overrides or {})  # a bad override fails here
        self.base = dataclasses.replace(self.base, guidance=resolve_guidance(self.base.guidance))
        self.threads = max(1, int(threads))
        # None: as many as the cores hold; 0: no workers (a manager that only keeps the books, for tests)
        self.max_concurrent = default_workers(self.threads) if max_concurrent is None else max(0, int(max_concurrent))
        self.max_runs_kept = max(1, int(max_runs_kept))
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds  # also a checkpoint this often: a killed worker loses at most this much
        # the turntable: 256 px for the person at the keyboard; 128 px on a public server, where the
        # 256 px one costs a worker about 20 s a run on one thread (against 4 s), the next visitor's wait
        self.export_defaults = dict(mesh_resolution=96, video="mp4", video_frames=24, video_size=PUBLIC_TURNTABLE_SIZE if public else 256)
        self.export_defaults.update(export_defaults or {})
        self.max_queue = max_queue
        self.public = public
        self.models = dict(models) if models else {self.base.guidance.name: self.base.guidance.model}
        self.abandon_after = abandon_after
        self.max_steps = max_steps
        self.stop_grace = stop_grace
        self.worker_nice = worker_nice
        self.runs: dict[str, Run] = {}
        self.queue: list[str] = []
        self.lock = threading.RLock()
        self.closing = False
        self.version = 0  # bumped whenever a run finishes (the gallery changes)
        self.seen: dict[str, float] = {}  # owner -> the last time their page asked anything
        self._secret = secrets.token_bytes(32)
        self._viewer_owners: OrderedDict[str, str] = OrderedDict()
        self._thumbs: OrderedDict[tuple, Path] = OrderedDict()
        # the gallery's thumbnails: written once each (atomically) under a random name, never rewritten,
        # and kept after their run is pruned, so a page that listed one can always fetch it
        self.gallery_dir = Path(tempfile.mkdtemp(prefix="dreamfusion-gallery-"))
        self._recover()
        self._preload = {"guidance": dataclasses.asdict(self.base.guidance), "device": self.base.device} if preload else None
        self._worker_index = 0
        self.workers: list[WorkerHandle] = []
        with self.lock:
            for _ in range(self.max_concurrent):
                self._spawn_worker()
        self._janitor = threading.Thread(target=self._janitor_loop, name="run-janitor", daemon=True)
        self._janitor.start()

    # ------------------------------------------------------------------ settings
    @staticmethod
    def guidance_choices() -> tuple[str, ...]:
        """The priors the app offers (the registry's user-facing ones)."""
        return USER_GUIDANCES

    def offered_guidances(self) -> tuple[str, ...]:
        """The priors a visitor of this server may pick: the operator's list on a public server."""
        return tuple(self.models) if self.public else USER_GUIDANCES

    def defaults(self) -> dict:
        b = self.base
        return {"steps": b.steps, "seed": b.seed, "guidance_name": b.guidance.name, "guidance_model": "" if self.public else b.guidance.model,
                "guidance_scale": b.guidance.guidance_scale, "render_size": b.render_size}

    def build_config(self, steps: int | None = None, seed: int | None = None, guidance_name: str | None = None, guidance_model: str | None = None,
                     guidance_scale: float | None = None, render_size: int | None = None) -> TrainConfig:
        """The server's base config with a visitor's settings, checked against the app's limits
        (the same builder as the command line: :func:`dreamfusion.config.with_settings`). Nothing is
        loaded here: a model outside the operator's list is refused before any worker sees it."""
        try:
            steps = None if steps is None else int(steps)
            seed = None if seed is None else int(seed)
            render_size = None if render_size is None else int(render_size)
            guidance_scale = None if guidance_scale is None else float(guidance_scale)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RunError(f"invalid setting: {exc}") from None
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise RunError(f"steps must be between 1 and {self.max_steps}, got {steps}")
        size_cap = PUBLIC_MAX_RENDER_SIZE if self.public else MAX_APP_RENDER_SIZE
        if render_size is not None and render_size > size_cap:
            raise RunError(f"resolution must be at most {size_cap} pixels on this server, got {render_size}")
        if guidance_scale is not None and not (0 <= guidance_scale <= MAX_GUIDANCE_SCALE):
            raise RunError(f"guidance weight must be between 0 and {MAX_GUIDANCE_SCALE:g}, got {guidance_scale:g}")
        if seed is not None and not 0 <= seed < 2**63:
            raise RunError(f"seed must be between 0 and 2^63, got {seed}")
        name = str(guidance_name) if guidance_name else None
        model = None if guidance_model is None else str(guidance_model).strip()
        if self.public:
            name = name or self.base.guidance.name
            if name not in self.models:
                raise RunError(f"this server offers these priors: {', '.join(self.models)}")
            if model and model != self.models[name]:
                raise RunError(f"the model is chosen by this server's operator: pick a prior ({', '.join(self.models)}) and leave the model empty")
            model = self.models[name]
        elif name is not None and name not in USER_GUIDANCES:
            raise RunError(f"unknown guidance {name!r}; choose {' or '.join(USER_GUIDANCES)}")
        cfg = with_settings(self.base, steps=steps, seed=seed, guidance=name, model=model, guidance_scale=guidance_scale, render_size=render_size)
        cfg = dataclasses.replace(cfg, guidance=resolve_guidance(cfg.guidance))
        try:
            validate_config(cfg)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        return cfg

    def finish_export(self) -> ExportOptions:
        """What a finished run writes without being asked: a GLB mesh and a turntable."""
        kw = dict(self.export_defaults)
        if kw.get("video", "mp4") == "none":
            kw["video"] = "mp4"
        return ExportOptions(formats=("glb",), **kw)

    # ------------------------------------------------------------------ workers
    def _spawn_worker(self) -> WorkerHandle:
        self._worker_index += 1
        w = WorkerHandle(self._worker_index, self.threads, self._on_event, self._on_exit, preload=self._preload, nice=self.worker_nice)
        self.workers.append(w)
        return w

    def wait_ready(self, timeout: float = 120.0) -> list[str]:
        """Wait until every worker has loaded the default prior; returns the errors of those that could not."""
        deadline = time.time() + timeout
        for w in list(self.workers):
            w.ready.wait(max(0.0, deadline - time.time()))
        return sorted({w.error for w in self.workers if w.error})

    def _idle_worker(self) -> WorkerHandle | None:
        idle = [w for w in self.workers if w.alive and w.run_id is None]
        ready = [w for w in idle if w.ready.is_set()]
        return (ready or idle or [None])[0]

    def _any_worker(self) -> WorkerHandle:
        """A worker for a short request (a prompt check, an export from a checkpoint): idle ones first."""
        with self.lock:
            alive = [w for w in self.workers if w.alive]
            if not alive:
                raise RunError("the server has no worker process right now: try again in a moment")
            return sorted(alive, key=lambda w: (w.run_id is not None, not w.ready.is_set()))[0]

    def _dispatch(self) -> None:
        """Hand queued runs to idle workers (under the lock)."""
        while self.queue and not self.closing:
            worker = self._idle_worker()
            if worker is None:
                return
            run = self.runs[self.queue.pop(0)]
            if run.resume is not None:
                job = job_payload(run=run.id, folder=str(run.folder), threads=self.threads, checkpoint_every=self.checkpoint_every,
                                  checkpoint_seconds=self.checkpoint_seconds, finish_export=self.finish_export(), prompt=run.prompt,
                                  resume_from=str(run.checkpoint),
                                  extra_steps=run.resume["extra_steps"])
            else:
                job = job_payload(run=run.id, folder=str(run.folder), threads=self.threads, checkpoint_every=self.checkpoint_every,
                                  checkpoint_seconds=self.checkpoint_seconds, finish_export=self.finish_export(), prompt=run.prompt,
                                  cfg=config_to_dict(run.cfg))
            if not worker.send("train", job):  # it died just now (its exit handler replaces it): the run waits on
                worker.alive = False
                self.queue.insert(0, run.id)
                continue
            worker.run_id, run.worker = run.id, worker
            run.status, run.finishing, run.stop_requested = "running", False, None
            run.step_times.clear()
            self._write_meta(run)

    def _on_event(self, worker: WorkerHandle, kind: str, p: dict) -> None:
        with self.lock:
            if kind == "ready":
                self._dispatch()
                return
            run = self.runs.get(p.get("run", ""))
            if run is None or run.worker is not worker:
                return
            if kind == "started":
                run.started, run.step, run.total_steps = True, p["step"], p["total_steps"]
                run.preview, run.preview_step = p["preview"], p["step"]
                run.step_times.clear()
                run.resume = None
            elif kind == "progress":
                run.step, run.total_steps = p["step"], p["total_steps"]
                if run.status == "running":
                    run.step_times.append(p["t"])
                if math.isfinite(p["loss"]):
                    run.losses.append((p["step"], float(p["loss"])))
                if "preview" in p:
                    run.preview, run.preview_step = p["preview"], p["step"]
                if "cameras" in p:
                    run.cameras = p["cameras"]
                if "checkpoint_step" in p:
                    run.checkpoint_step = p["checkpoint_step"]
                    self._write_meta(run)
            elif kind == "message":
                run.message = p["text"]
            elif kind == "snapshot":
                run.snapshot = (p["step"], p["tensors"])
            elif kind == "ended":
                run.finishing, run.stop_requested = True, None
            elif kind == "finished":
                self._finish(run, p["status"], p.get("message") or "", p["step"], p["total_steps"], p.get("exports", {}))

    def _finish(self, run: Run, status: str, message: str, step: int, total_steps: int, exports: dict) -> None:
        if run.worker is not None:
            run.worker.run_id = None
        run.worker, run.finishing, run.stop_requested, run.snapshot = None, False, None, None
        run.status, run.step, run.total_steps = status, step, total_steps
        run.message = message or ("" if status == "done" else run.message)
        if exports:
            run.exports = {k: Path(v) for k, v in exports.items()}
        if run.checkpoint.is_file():
            run.checkpoint_step = step if status != "failed" else run.checkpoint_step
        self._write_meta(run)
        self.version += 1
        if run.resume is not None and not self.closing:  # refined while it was being written: continue it
            self._enqueue(run)
        self._dispatch()

    def _on_exit(self, worker: WorkerHandle) -> None:
        """A worker is gone: its run fails (or, stopped by its owner, ends stopped) with its last
        checkpoint, and a new worker takes its place."""
        with self.lock:
            if worker in self.workers:
                self.workers.remove(worker)
            run = self.runs.get(worker.run_id or "")
            if run is not None and run.worker is worker:
                kept = (f"its last checkpoint (step {run.checkpoint_step}) is kept" if run.checkpoint.is_file()
                        else "no checkpoint had been written yet")
                if self.closing:
                    self._finish(run, "stopped", f"the server was shut down; {kept}", run.checkpoint_step or run.step, run.total_steps, {})
                elif run.stop_requested is not None:
                    self._finish(run, "stopped", f"stopped mid-step; {kept}", run.checkpoint_step or run.step, run.total_steps, {})
                    if run.checkpoint.is_file():  # its result, from that checkpoint, as a finished run would have written it
                        threading.Thread(target=self._export_stopped, args=(run,), daemon=True).start()
                else:
                    self._finish(run, "failed", f"the worker process training this run {worker.exit_description()}; {kept}",
                                 run.step, run.total_steps, {})
                    print(f"app: run {run.id} failed: worker {worker.pid} {worker.exit_description()}")
            if not self.closing and len(self.workers) < self.max_concurrent:
                self._spawn_worker()
            self._dispatch()

    def _export_stopped(self, run: Run) -> None:
        """Write a run's mesh, turntable and preview from its checkpoint (a worker was killed to stop it)."""
        payload = {"folder": str(run.folder), "options": dataclasses.asdict(self.finish_export()), "checkpoint": str(run.checkpoint)}
        try:
            written = self._any_worker().request("export_checkpoint", payload, timeout=600)
        except (WorkerError, RunError) as exc:
            print(f"app: run {run.id}: no mesh from its checkpoint: {exc}")
            return
        with self.lock:
            run.exports = {k: Path(v) for k, v in written.items() if k in ("glb", "video")}
            self.version += 1

    def _janitor_loop(self) -> None:
        """Stops that a worker did not honour in time end with the worker; abandoned runs are stopped."""
        while not self.closing:
            time.sleep(0.2)
            now = time.time()
            kill = []
            with self.lock:
                for run in list(self.runs.values()):
                    # a step that outlasts the grace (a slow prior, a big render) ends with its worker: Stop takes
                    # effect within stop_grace, and the run keeps its last checkpoint (at most checkpoint_seconds old)
                    if run.stop_requested is not None and run.worker is not None and not run.finishing and run.started:
                        if now - run.stop_requested > self.stop_grace:
                            kill.append(run.worker)
                    if self.abandon_after and run.active and now - self.seen.get(run.owner, now) > self.abandon_after:
                        self._stop_locked(run, "stopped: its page has been closed for a while")
                if len(self.seen) > 1000:  # forget visitors long gone (their runs, if any, are over)
                    busy = {r.owner for r in self.runs.values() if r.active}
                    for owner, t in list(self.seen.items()):
                        if now - t > 3600 and owner not in busy:
                            del self.seen[owner]
            for w in kill:
                w.kill()

    # ------------------------------------------------------------------ queries
    def touch(self, owner: str) -> None:
        """``owner``'s page is still there (each poll and action says so)."""
        self.seen[owner] = time.time()

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
            with self.lock:
                run = self.runs.get(run_id)
            if run is None or run.owner != owner:  # the same answer for a run that is someone else's or none
                raise RunError(f"no run {run_id!r} of yours on this server: you can only control your own runs")
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

    def _rate(self) -> float:
        rates = [r.its() for r in self.runs.values() if r.status == "running" and r.its() > 0]
        return sum(rates) / len(rates) if rates else 0.0

    def estimated_start(self, run: Run) -> float | None:
        """Seconds until a queued run starts, estimated from the runs ahead of it: their remaining
        steps at the speed of the running ones (None when not queued or nothing is measured yet)."""
        with self.lock:
            if run.id not in self.queue:
                return None
            rate = self._rate()
            if rate <= 0:
                return None
            running = [r for r in self.runs.values() if r.worker is not None]
            ahead = [self.runs[i] for i in self.queue[: self.queue.index(run.id)]]
            slots = sorted(max(0, r.total_steps - r.step) / rate for r in running)
            slots += [0.0] * max(0, self.max_concurrent - len(slots))
            for r in ahead:  # each run ahead takes the slot that frees first
                slots.sort()
                slots[0] += max(0, r.total_steps - r.step) / rate
            return min(slots) if slots else None

    def busy_message(self) -> str:
        with self.lock:
            rate = self._rate() or 3.0
            work = sum(max(0, r.total_steps - r.step) for r in self.runs.values() if r.active)
            minutes = max(1, math.ceil(work / rate / max(1, self.max_concurrent) / 60))
            return (f"The server is busy: {len(self.queue)} runs are waiting. Please try again in about {minutes} minute"
                    f"{'s' if minutes > 1 else ''}.")

    def finished(self) -> list[dict]:
        """This server's finished runs on disk (newest first): what the gallery shows. Each entry
        carries its preview as a thumbnail file of its own under a random name (``preview``),
        written once and never rewritten while it may still be listed, its prompt and status; no run
        id, no server path of the run."""
        out = []
        with self.lock:
            for meta_path in self.runs_dir.glob("*/run.json"):
                try:
                    meta = json.loads(meta_path.read_text())
                    if meta.get("status") not in ("done", "stopped"):
                        continue
                    thumb = self._thumbnail(meta_path.parent / "preview.png", (meta["id"], meta.get("step", 0)))
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # a run without a preview (or half-deleted) is not listed
                out.append({"preview": str(thumb), "prompt": str(meta.get("prompt", "")), "status": meta["status"],
                            "step": int(meta.get("step", 0)), "created": float(meta.get("created", 0))})
        return sorted(out, key=lambda m: m["created"], reverse=True)

    def _thumbnail(self, preview: Path, key: tuple) -> Path:
        if not preview.is_file():
            raise OSError(f"no preview: {preview}")  # the run lost it (pruned mid-listing): not listed
        target = self._thumbs.get(key)
        if target is None or not target.exists():
            target = self.gallery_dir / f"{secrets.token_urlsafe(16)}.png"
            atomic_write(target, lambda tmp: shutil.copyfile(preview, tmp))
            self._thumbs[key] = target
            while len(self._thumbs) > self.GALLERY_FILES:
                _, old = self._thumbs.popitem(last=False)
                old.unlink(missing_ok=True)
        return target

    # ------------------------------------------------------------------ the viewer
    def viewer_key(self, owner: str) -> str:
        """A key the page puts in its viewer's address: it lets the viewer follow ``owner``'s runs
        (and nothing else), and gives away nothing of the owner's token."""
        key = hmac.new(self._secret, owner.encode(), hashlib.sha256).hexdigest()[:32]
        with self.lock:
            self._viewer_owners[key] = owner
            self._viewer_owners.move_to_end(key)
            while len(self._viewer_owners) > 10000:
                self._viewer_owners.popitem(last=False)
        return key

    def viewer_owner(self, key: str | None) -> str | None:
        with self.lock:
            return self._viewer_owners.get(key or "")

    def viewer_run(self, owner: str | None) -> Run | None:
        """What a viewer shows: its owner's latest run that has a scene, else the newest finished result."""
        with self.lock:
            if owner is not None:
                mine = [r for r in self.runs.values() if r.owner == owner and (r.started or r.checkpoint_step)]
                if mine:
                    return max(mine, key=lambda r: r.created)
            done = [r for r in self.runs.values() if r.status == "done" and r.checkpoint_step]
            return max(done, key=lambda r: r.created) if done else None

    def scene_source(self, run: Run, max_age: float = 1.0) -> tuple[tuple, object] | None:
        """Where a viewer gets ``run``'s scene: ``(key, tensors)`` of the latest snapshot of a run in
        training (a new one is asked for when this one is older than ``max_age`` seconds), or
        ``(key, checkpoint path)`` of a finished run; None while there is nothing to show."""
        with self.lock:
            if run.worker is not None and run.started:
                now = time.time()
                if now - run.snapshot_asked >= max_age and (run.snapshot is None or run.snapshot[0] != run.step):
                    run.snapshot_asked = now
                    run.worker.send("snapshot", {"run": run.id})
                if run.snapshot is None:
                    return None
                return ("live", run.id, run.snapshot[0]), run.snapshot[1]
            if run.checkpoint_step and run.checkpoint.is_file():
                return ("checkpoint", run.id, run.checkpoint_step), run.checkpoint
            return None

    # ------------------------------------------------------------------ actions
    def submit(self, owner: str, prompt: str, **settings) -> Run:
        prompt = validate_prompt(prompt)
        cfg = self.build_config(**settings)
        with self.lock:
            if self.closing:
                raise RunError("the server is shutting down")
            for r in self.runs.values():
                if r.owner == owner and r.active:
                    raise RunError(f"your run {r.id} is still {r.status}: stop it before generating another "
                                   "(or use Refine to change its prompt)")
            if self.max_queue is not None and len(self.queue) >= self.max_queue:
                raise RunError(self.busy_message())
            self.touch(owner)
            run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:10]
            run = Run(run_id, owner, prompt, cfg, self.runs_dir / run_id, total_steps=cfg.steps)
            run.prompts.append((0, prompt))
            run.folder.mkdir(parents=True)
            self.runs[run_id] = run
            self._prune_disk()
            self._enqueue(run)
        return run

    def check_prompt(self, cfg: TrainConfig, prompt: str, timeout: float = 20.0) -> str | None:
        """Ask a worker whether the run's prior takes ``prompt`` (:class:`RunError` if not) and for
        its note on a prompt far from what it knows (None: a known prompt, or no answer in time)."""
        payload = {"guidance": dataclasses.asdict(cfg.guidance), "device": cfg.device, "prompt": prompt}
        try:
            return self._any_worker().request("check", payload, timeout)
        except WorkerError as exc:
            if "no answer" in str(exc) or "process" in str(exc):
                return None
            raise RunError(f"cannot use {prompt!r}: {exc}") from None

    def vocabulary_note(self, cfg: TrainConfig, prompt: str) -> str | None:
        """The prior's note for a prompt far from what it knows (None for a known prompt, or when
        the prior cannot say: the run itself reports a prior that does not load)."""
        try:
            return self.check_prompt(cfg, prompt, timeout=10.0)
        except RunError:
            return None

    def pause(self, owner: str, run_id: str | None = None) -> Run:
        run = self.owned(owner, run_id)
        with self.lock:
            if run.status != "running" or run.worker is None or run.finishing:
                raise RunError(f"run {run.id} is {run.status}, not running: nothing to pause")
            run.worker.send("pause", {"run": run.id})
            run.status = "paused"
            self._write_meta(run)
        return run

    def resume(self, owner: str, run_id: str | None = None) -> Run:
        run = self.owned(owner, run_id)
        with self.lock:
            if run.status != "paused" or run.worker is None:
                raise RunError(f"run {run.id} is {run.status}, not paused: nothing to resume")
            run.worker.send("resume", {"run": run.id})
            run.status = "running"
            run.step_times.clear()
            self._write_meta(run)
        return run

    def stop(self, owner: str, run_id: str | None = None) -> Run:
        run = self.owned(owner, run_id)
        with self.lock:
            if not run.active:
                raise RunError(f"run {run.id} is already {run.status}")
            self._stop_locked(run, "")
        return run

    def _stop_locked(self, run: Run, message: str) -> None:
        if run.id in self.queue:
            self.queue.remove(run.id)
            run.resume = None
            run.status = "stopped"
            run.message = message or ("stopped before it started" if not run.checkpoint_step else "stopped")
            self._write_meta(run)
            self.version += 1
            return
        if run.worker is not None and run.stop_requested is None:
            run.worker.send("stop", {"run": run.id})  # after the current step; the worker then writes the run
            run.stop_requested = time.time()
            run.message = message or "stopping…"
            if run.status == "paused":
                run.status = "running"

    def refine(self, owner: str, prompt: str, extra_steps: int = 0, run_id: str | None = None) -> Run:
        """Change the prompt of the caller's run and keep optimising the same scene (Figure 4).
        Everything is checked before anything changes: a rejected request changes nothing."""
        run = self.owned(owner, run_id)
        prompt = validate_prompt(prompt)
        try:
            extra_steps = int(extra_steps or 0)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RunError(f"invalid extra steps: {exc}") from None
        if not 0 <= extra_steps <= self.max_steps:
            raise RunError(f"extra steps must be between 0 and {self.max_steps}, got {extra_steps}")
        with self.lock:
            if run.status == "failed":
                raise RunError(f"run {run.id} failed: {run.message}")
            if run.status == "queued" and run.resume is None and not run.started:
                run.prompt = prompt
                run.prompts[-1:] = [(0, prompt)]
                run.cfg = dataclasses.replace(run.cfg, steps=run.cfg.steps + extra_steps)
                run.total_steps = run.cfg.steps
                self._write_meta(run)
                return run
            worker = run.worker if run.status in ("running", "paused") else None
            run.message = ""  # a note about the old prompt (its truncation, say) no longer holds
        if worker is not None:
            try:
                reply = worker.request("refine", {"run": run.id, "prompt": prompt, "extra_steps": extra_steps}, timeout=60)
            except WorkerError as exc:
                raise RunError(f"cannot refine with {prompt!r}: {exc}") from None
            if not reply["finishing"]:
                with self.lock:
                    run.prompt, run.total_steps = prompt, reply["total_steps"]
                    run.prompts.append((reply["step"], prompt))
                    self._write_meta(run)
                return run
            deadline = time.time() + 300  # it was being written: refine the finished run
            while run.active and time.time() < deadline:
                time.sleep(0.05)
        with self.lock:
            if run.active:
                raise RunError(f"run {run.id} is busy ({run.status}): try again in a moment")
            if run.status == "failed":
                raise RunError(f"run {run.id} failed: {run.message}")
            if not run.checkpoint.is_file():
                raise RunError(f"run {run.id} has no checkpoint to continue from")
            if run.step >= run.total_steps and not extra_steps:
                raise RunError(f"run {run.id} is {run.status}: give extra steps to keep optimising it with the new prompt")
            if self.max_queue is not None and len(self.queue) >= self.max_queue:
                raise RunError(self.busy_message())
        self.check_prompt(run.cfg, prompt)  # the prior refuses it: nothing has changed
        with self.lock:
            if run.active:
                raise RunError(f"run {run.id} is busy ({run.status}): try again in a moment")
            run.resume = {"extra_steps": extra_steps}
            run.prompt = prompt
            run.total_steps = run.step + max(0, run.total_steps - run.step) + extra_steps
            run.prompts.append((run.step, prompt))
            run.message = ""
            self._enqueue(run)
        return run

    def export(self, owner: str, formats: Sequence[str] | None = ("glb",), run_id: str | None = None, **opts) -> dict[str, Path]:
        """Export the current scene of the caller's run (in training, in a worker; finished, from its
        checkpoint, in a worker too)."""
        from dreamfusion.runs import validate_export

        run = self.owned(owner, run_id)
        formats = [str(f).lower() for f in (formats or [])]
        if not formats:
            raise RunError("choose at least one export format")
        unknown = [f for f in formats if f not in MESH_FORMATS and f not in ("textured_glb", "video", "mp4")]
        if unknown:
            raise RunError(f"unknown export format {unknown[0]!r}; choose from glb, textured_glb, obj, ply, video")
        kw = dict(self.export_defaults)
        kw.update(opts)
        if "textured_glb" in formats:  # mesh_textured.glb: UVs, the colours baked into a PNG inside
            kw["texture"] = True
        kw["video"] = kw.get("video", "mp4") if ("video" in formats or "mp4" in formats) else "none"
        if kw["video"] == "none" and ("video" in formats or "mp4" in formats):
            kw["video"] = "mp4"
        options = ExportOptions(formats=tuple(f for f in formats if f in MESH_FORMATS), **kw)
        try:
            validate_export(options)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        with self.lock:
            live = run.worker if run.worker is not None and run.started and not run.finishing else None
            if live is None and not (run.checkpoint_step and run.checkpoint.is_file()):
                raise RunError(f"run {run.id} has no scene yet ({run.status}): wait until it starts")
            run.export_count += 1
            folder = run.folder / f"export-{run.export_count:03d}"
        payload = {"folder": str(folder), "options": dataclasses.asdict(options)}
        try:
            if live is not None:
                written = live.request("export", {**payload, "run": run.id}, timeout=600)
            else:
                written = self._any_worker().request("export_checkpoint", {**payload, "checkpoint": str(run.checkpoint)}, timeout=600)
        except WorkerError as exc:
            raise RunError(f"export failed: {exc}") from None
        with self.lock:
            run.exports = {k: Path(v) for k, v in written.items()}
            return dict(run.exports)

    # ------------------------------------------------------------------ machinery
    def _enqueue(self, run: Run) -> None:
        run.status = "queued"
        self.queue.append(run.id)
        self._write_meta(run)
        self._dispatch()

    def _write_meta(self, run: Run) -> None:
        """``run.json``: the run's state as it is now (what the gallery and a restarted server read)."""
        meta = {"id": run.id, "prompt": run.prompt, "prompts": run.prompts, "status": run.status, "created": run.created,
                "step": run.step, "total_steps": run.total_steps, "checkpoint_step": run.checkpoint_step, "message": run.message}
        try:
            atomic_write(run.folder / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
        except OSError:
            pass

    def _recover(self) -> None:
        """Runs a previous server left active (it was killed): failed, with their checkpoint kept."""
        for meta_path in self.runs_dir.glob("*/run.json"):
            try:
                meta = json.loads(meta_path.read_text())
                if meta.get("status") not in ACTIVE:
                    continue
                has = (meta_path.parent / "checkpoint.safetensors").is_file()
                step = int(meta.get("checkpoint_step") or 0)
                meta["status"] = "stopped" if has and (meta_path.parent / "preview.png").is_file() else "failed"
                meta["message"] = (f"the server stopped while this run was {meta.get('status')}; "
                                   + (f"its last checkpoint (step {step}) is kept" if has else "nothing was saved"))
                if has:
                    meta["step"] = step
                atomic_write(meta_path, lambda tmp, m=meta: Path(tmp).write_text(json.dumps(m, indent=2)))
            except (OSError, ValueError, TypeError):
                continue

    def _prune_disk(self) -> None:
        """Keep at most ``max_runs_kept`` run folders: delete the oldest inactive ones."""
        folders = sorted((p for p in self.runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        busy = {r.id for r in self.runs.values() if r.active or r.worker is not None}
        excess = len(folders) - self.max_runs_kept
        for p in folders:
            if excess <= 0:
                break
            if p.name in busy:
                continue
            shutil.rmtree(p, ignore_errors=True)
            self.runs.pop(p.name, None)
            excess -= 1

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every run (each writes what it can in ``timeout`` seconds) and end the workers."""
        with self.lock:
            self.closing = True
            for rid in list(self.queue):
                run = self.runs[rid]
                run.status, run.message = "stopped", "the server was shut down before it started"
                self._write_meta(run)
            self.queue.clear()
            workers = list(self.workers)
        deadline = time.time() + timeout
        for w in workers:
            w.send("shutdown")
        for w in workers:
            w.close(max(0.5, deadline - time.time()))
        with self.lock:
            for run in self.runs.values():
                if run.active:
                    run.status, run.message = "stopped", "the server was shut down"
                    self._write_meta(run)
        shutil.rmtree(self.gallery_dir, ignore_errors=True)


