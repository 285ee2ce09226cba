"""The app's worker processes: each trains the runs it is given, one after another, away from the
page's process, so the page, its polls and the live viewer never share an interpreter with an
optimisation, and a crash in one (a segfault, running out of memory) costs only its own run.

A worker is a fresh interpreter (``python -m app.worker``: no copy of the page's threads or locks,
and nothing of the program that started the page is run again) that talks to the page over one
duplex connection (a socket pair):

- the page sends commands, ``(kind, payload)``: ``train`` a job (a run from scratch or from its
  checkpoint), and for the run it trains ``pause``, ``resume``, ``stop``, ``refine``, ``export``,
  ``snapshot`` (the scene's tensors, for the viewer); ``check`` a prompt against a prior; ``shutdown``;
- the worker sends events: ``ready`` (its default prior is loaded), ``started``, ``progress``
  (step, loss, a preview now and then, the latest training cameras), ``message``, ``ended`` (the
  training loop is over, the run is being written), ``finished``, ``snapshot``, and ``reply`` to a
  command that asked for one (``id``).

Commands are read by a listener thread while the main thread trains, so Stop or Pause act on the
:class:`~dreamfusion.trainer.Trainer` at once (between two of its steps). Exports and replies that
take a moment run on short-lived threads of their own; nothing a worker does waits for the page.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from pathlib import Path

#: the folder that holds the ``app`` and ``dreamfusion`` packages (a worker imports them from there)
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: seconds between two sets of training cameras sent to the page (the viewer's frustums)
CAMERAS_EVERY = 0.5


def return_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the system (glibc's malloc_trim; a
    no-op elsewhere): without it a long-lived worker keeps the freed heap of every run it trained."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def describe_exit(code: int | None) -> str:
    """A worker's exit status in words: ``-9`` is 'killed (SIGKILL: out of memory, or killed by hand)'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = {"SIGKILL": ": out of memory, or killed by hand", "SIGSEGV": ": a crash in native code"}.get(name, "")
        return f"killed by {name}{why}"
    return f"exited with status {code}"


# ============================================================================ the worker's side


class _Worker:
    """State of one worker process: the run it trains and the pipe to the page."""

    def __init__(self, conn: object):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()  # the current run and what the page asked of it before it started
        self.trainer = None
        self.run_id: str | None = None
        self.finishing = False
        self.pending_stop = False
        self.pending_pause = False
        self.closing = False

    def send(self, kind: str, payload: dict) -> None:
        try:
            with self.send_lock:
                self.conn.send((kind, payload))
        except (OSError, EOFError, BrokenPipeError):
            self.closing = True  # the page is gone: finish up and leave

    def reply(self, request_id: int, fn: Callable[[], object]) -> None:
        """Run ``fn`` and send its value (or its error, one line) as the reply to ``request_id``."""
        try:
            self.send("reply", {"id": request_id, "ok": True, "value": fn()})
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the page as a message
            self.send("reply", {"id": request_id, "ok": False, "error": _one_line(exc)})

    def in_thread(self, request_id: int, fn: Callable[[], object]) -> None:
        threading.Thread(target=self.reply, args=(request_id, fn), daemon=True).start()

    # ------------------------------------------------------------------ commands
    def listen(self) -> None:
        while True:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                kind, payload = "shutdown", {}
            if kind == "shutdown":
                self.closing = True
                with self.lock:
                    if self.trainer is not None:
                        self.trainer.stop()
                self.jobs.put(None)
                return
            try:
                self.command(kind, payload)
            except Exception as exc:  # noqa: BLE001 - a bad command must not end the listener
                if "id" in payload:
                    self.send("reply", {"id": payload["id"], "ok": False, "error": _one_line(exc)})

    def command(self, kind: str, p: dict) -> None:
        if kind == "train":
            self.jobs.put(p)
            return
        if kind == "check":
            self.in_thread(p["id"], lambda: _check_prompt(p["guidance"], p["device"], p["prompt"]))
            return
        if kind == "export_checkpoint":
            self.in_thread(p["id"], lambda: _export_checkpoint(p["checkpoint"], p["folder"], p["options"]))
            return
        with self.lock:
            mine = p.get("run") == self.run_id
            trainer = self.trainer if mine else None
            if kind in ("pause", "resume", "stop") and mine and trainer is None:  # still being set up
                if kind == "stop":
                    self.pending_stop = True
                else:
                    self.pending_pause = kind == "pause"
                return
        if kind in ("pause", "resume", "stop"):
            if trainer is not None:
                getattr(trainer, kind)()
        elif kind == "refine":
            self.in_thread(p["id"], lambda: self.refine(p["run"], p["prompt"], p["extra_steps"]))
        elif kind == "export":
            self.in_thread(p["id"], lambda: self.export(p["run"], p["folder"], p["options"]))
        elif kind == "snapshot":
            if trainer is not None:
                threading.Thread(target=self.send_snapshot, args=(p["run"], trainer), daemon=True).start()
        else:
            raise ValueError(f"unknown command {kind!r}")

    def refine(self, run_id: str, prompt: str, extra_steps: int) -> dict:
        """Change the prompt of the run being trained (and add steps): applied before its training
        loop is over, or refused with ``finishing`` (the page then continues it from its checkpoint)."""
        with self.lock:
            trainer = self.trainer if run_id == self.run_id else None
            if trainer is None or self.finishing:
                return {"finishing": True}
            trainer.set_prompt(prompt)  # may refuse the prompt: nothing has changed then
            if extra_steps:
                trainer.extend(extra_steps)
            return {"finishing": False, "step": trainer.step_count, "total_steps": trainer.total_steps}

    def export(self, run_id: str, folder: str, options: dict) -> dict:
        from dreamfusion.config import ExportOptions
        from dreamfusion.runs import export_scene

        with self.lock:
            trainer = self.trainer if run_id == self.run_id else None
        if trainer is None:
            raise RuntimeError("the run is no longer training here")
        written = export_scene(trainer, Path(folder), ExportOptions(**options))
        return {k: str(v) for k, v in written.items()}

    def send_snapshot(self, run_id: str, trainer: object) -> None:
        from dreamfusion.checkpoint import scene_tensors

        with trainer.lock:  # one step's scene, copied (scene_tensors shares the grids' storage on a CPU)
            tensors = {k: v.numpy().copy() for k, v in scene_tensors(trainer.renderer).items()}
            step = trainer.step_count
        self.send("snapshot", {"run": run_id, "step": step, "tensors": tensors})

    # ------------------------------------------------------------------ training
    def train_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.closing:
                return
            self.train(job)

    def train(self, job: dict) -> None:
        import torch

        from dreamfusion.config import ExportOptions, config_from_dict
        from dreamfusion.export import to_uint8
        from dreamfusion.files import atomic_write
        from dreamfusion.runs import write_run
        from dreamfusion.trainer import Trainer

        run_id, folder = job["run"], Path(job["folder"])
        checkpoint = folder / "checkpoint.safetensors"
        every = int(job.get("checkpoint_every") or 0)
        every_s = float(job.get("checkpoint_seconds") or 0.0)
        last_cameras, last_checkpoint = [0.0], [time.time()]
        trainer = None

        def on_metrics(m: dict) -> None:
            out = {"run": run_id, "step": m["step"], "total_steps": m["total_steps"], "loss": m["loss"], "t": time.time(),
                   "prompt": m["prompt"]}
            if "preview" in m:
                out["preview"] = to_uint8(m["preview"])
            now = time.time()
            if now - last_cameras[0] >= CAMERAS_EVERY:
                last_cameras[0] = now
                out["cameras"] = [(c2w.numpy().copy(), focal) for c2w, focal in trainer.training_cameras()]
            if (every and m["step"] % every == 0) or (every_s and now - last_checkpoint[0] >= every_s):
                import imageio.v3 as iio

                trainer.save_checkpoint(checkpoint)
                last_checkpoint[0] = time.time()
                image = out["preview"] if "preview" in out else to_uint8(trainer.preview())
                atomic_write(folder / "preview.png", lambda tmp: iio.imwrite(tmp, image))  # the gallery's, should the worker die
                out["checkpoint_step"] = m["step"]
            self.send("progress", out)

        def on_message(text: str) -> None:
            self.send("message", {"run": run_id, "text": text})

        try:
            torch.set_num_threads(job["threads"])
            if job.get("resume_from"):
                trainer = Trainer.from_checkpoint(job["resume_from"], callbacks=[on_metrics], on_message=on_message)
                if job["prompt"] != trainer.prompt:
                    trainer.set_prompt(job["prompt"])
                if job.get("extra_steps"):
                    trainer.extend(job["extra_steps"])
            else:
                trainer = Trainer(config_from_dict(job["cfg"]), job["prompt"], callbacks=[on_metrics], on_message=on_message)
            with self.lock:
                self.trainer, self.run_id, self.finishing = trainer, run_id, False
                if self.pending_stop or self.closing:
                    trainer.stop()
                elif self.pending_pause:
                    trainer.pause()
                self.pending_stop = self.pending_pause = False
            self.send("started", {"run": run_id, "step": trainer.step_count, "total_steps": trainer.total_steps,
                                  "preview": to_uint8(trainer.preview()), "t": time.time()})
            while True:
                trainer.run()
                with self.lock:  # a Refine lands before this check (and is trained) or after it (and is refused)
                    if trainer.stopped or trainer.done:
                        self.finishing = True
                        break
            status = "stopped" if trainer.stopped and not trainer.done else "done"
            self.send("ended", {"run": run_id, "status": status, "step": trainer.step_count})
            message = ""
            try:
                written = write_run(trainer, folder, ExportOptions(**job["finish_export"]))
                exports = {k: str(v) for k, v in written.items() if k in ("glb", "video")}
            except Exception as exc:  # noqa: BLE001 - the scene trained; say why its files are missing
                exports, message = {}, f"could not save the run: {_one_line(exc)}"
                if trainer.step_count:
                    try:
                        trainer.save_checkpoint(checkpoint)
                    except Exception:  # noqa: BLE001 - the disk refuses: the message above says so
                        pass
            self.send("finished", {"run": run_id, "status": status, "message": message, "exports": exports,
                                   "step": trainer.step_count, "total_steps": trainer.total_steps, "prompt": trainer.prompt})
        except Exception as exc:  # noqa: BLE001 - a failed run is reported; the worker takes the next one
            from dreamfusion.guidance import GuidanceError

            if isinstance(exc, ValueError | OSError | GuidanceError):  # what the user asked for, or the disk: one line
                print(f"app: run {run_id} failed: {_one_line(exc)}", file=sys.stderr)
            else:  # a defect: its traceback is what a report needs
                traceback.print_exc(file=sys.stderr)
            self.send("finished", {"run": run_id, "status": "failed", "message": _one_line(exc), "exports": {},
                                   "step": trainer.step_count if trainer is not None else 0,
                                   "total_steps": trainer.total_steps if trainer is not None else 0})
        finally:
            with self.lock:
                self.trainer, self.run_id, self.finishing = None, None, False
            trainer = None
            gc.collect()
            return_freed_memory()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ValueError | RuntimeError) and text else f"{type(exc).__name__}: {text}"


def _check_prompt(guidance: dict, device: str, prompt: str) -> str | None:
    """Load (once per process) the prior a run will use, refuse a prompt it cannot take, and return its
    note for a prompt far from what it knows (None: a known prompt)."""
    from dreamfusion.config import GuidanceConfig
    from dreamfusion.guidance import load_guidance

    prior = load_guidance(GuidanceConfig(**guidance), device)
    prior.check_prompt(prompt)
    return prior.vocabulary_note(prompt)


def _export_checkpoint(checkpoint: str, folder: str, options: dict) -> dict:
    """Meshes and turntable of a finished run, from its checkpoint (no prior is loaded)."""
    from dreamfusion.checkpoint import load_scene
    from dreamfusion.config import ExportOptions
    from dreamfusion.runs import export_renderer, exported_files

    opts = ExportOptions(**options)
    scene, _, _ = load_scene(checkpoint)
    export_renderer(scene, Path(folder), opts)
    return {k: str(v) for k, v in exported_files(Path(folder), opts).items()}


def worker_main(conn: object, threads: int, preload: dict | None, nice: int) -> None:
    """The worker process: load the default prior, say ``ready``, then train what comes."""
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    import torch

    torch.set_num_threads(threads)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    worker = _Worker(conn)
    error = None
    if preload is not None:
        try:
            _check_prompt(preload["guidance"], preload["device"], "a red cube")  # loads the prior and its vocabulary
        except Exception as exc:  # noqa: BLE001 - the page starts anyway; a run says the same
            error = _one_line(exc)
    worker.send("ready", {"pid": os.getpid(), "error": error})
    threading.Thread(target=worker.listen, name="worker-commands", daemon=True).start()
    worker.train_loop()


# ============================================================================ the page's side


class WorkerError(RuntimeError):
    """A worker refused a command, did not answer in time, or is gone."""


class WorkerHandle:
    """The page's end of one worker process: send commands, wait for replies, and hand every other
    event to ``on_event(handle, kind, payload)``; ``on_exit(handle)`` once the process is gone."""

    _ids = itertools.count(1)

    def __init__(self, index: int, threads: int, on_event: Callable, on_exit: Callable, preload: dict | None = None, nice: int = 0):
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        args = [sys.executable, "-m", "app.worker", str(theirs.fileno()), str(threads), str(nice), json.dumps(preload)]
        self.index = index
        self.proc = subprocess.Popen(args, pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.on_event, self.on_exit = on_event, on_exit
        self.send_lock = threading.Lock()
        self.replies: dict[int, Future] = {}
        self.ready = threading.Event()
        self.error: str | None = None  # why the default prior did not load
        self.run_id: str | None = None  # set by the manager
        self.alive = True
        self.reader = threading.Thread(target=self._read, name=f"worker-{index}-events", daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def send(self, kind: str, payload: dict | None = None) -> bool:
        """Send a command; False when the worker is gone."""
        try:
            with self.send_lock:
                self.conn.send((kind, payload or {}))
            return True
        except (OSError, EOFError, BrokenPipeError, ValueError):
            return False

    def request(self, kind: str, payload: dict, timeout: float) -> object:
        """Send a command and wait for its reply; :class:`WorkerError` with the worker's message."""
        rid = next(self._ids)
        fut: Future = Future()
        self.replies[rid] = fut
        try:
            if not self.send(kind, {**payload, "id": rid}):
                raise WorkerError("the worker process is gone")
            try:
                reply = fut.result(timeout)
            except FutureTimeout:
                raise WorkerError(f"no answer from the worker in {timeout:g} s") from None
        finally:
            self.replies.pop(rid, None)
        if not reply["ok"]:
            raise WorkerError(reply["error"])
        return reply["value"]

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # noqa: BLE001 - an unreadable message: report and go on
                print(f"app: unreadable message from worker {self.index}: {_one_line(exc)}", file=sys.stderr)
                continue
            if kind == "reply":
                fut = self.replies.get(payload["id"])
                if fut is not None and not fut.done():
                    fut.set_result(payload)
                continue
            if kind == "ready":
                self.error = payload.get("error")
                self.ready.set()
            try:
                self.on_event(self, kind, payload)
            except Exception:  # noqa: BLE001 - the page's bookkeeping must not stop the reader
                traceback.print_exc(file=sys.stderr)
        self.alive = False
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # it closed its end but lives on: it is of no use any more
            self.proc.kill()
            self.proc.wait(5)
        for fut in list(self.replies.values()):
            if not fut.done():
                fut.set_result({"ok": False, "error": f"the worker process {describe_exit(self.exitcode)}"})
        self.ready.set()
        self.on_exit(self)

    def exit_description(self) -> str:
        return describe_exit(self.exitcode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop (its run ends after the current step) and wait; killed after ``timeout``."""
        self.send("shutdown")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        try:
            self.conn.close()
        except OSError:
            pass


def job_payload(**fields: object) -> dict:
    """A ``train`` command's payload (dataclass values as plain dicts: the pipe carries plain data)."""
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()}


if __name__ == "__main__":  # python -m app.worker FD THREADS NICE PRELOAD_JSON, started by WorkerHandle
    worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]), json.loads(sys.argv[4]), int(sys.argv[3]))
