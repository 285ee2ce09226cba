"""One run, from a prompt to a finished run folder: what ``dreamfusion generate`` runs, and what
each prompt of ``dreamfusion batch`` runs in its worker.

The run is written into ``DIR.partial`` under ``DIR``'s lock (:func:`dreamfusion.runs.staged_output`)
and moved into place when whole. While it trains, its log is appended there step by step and its
checkpoint written every ``checkpoint_every`` steps (atomically), so a run killed outright loses at
most that many steps; a run stopped by Ctrl-C or SIGTERM (with ``stop_on_signal``) ends its current
step and writes its checkpoint there. :func:`generate` with ``resume_from`` continues such a run, to
the same result, bit for bit, as a run that never stopped.

Importing this module imports no torch: callers check their input first, then call :func:`generate`.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CHECKPOINT_FILE
from .config import ExportOptions, TrainConfig, validate_config, validate_export, validate_prompt
from .files import staging_folder

if TYPE_CHECKING:
    from .trainer import Trainer

LOG_FILE = "log.jsonl"
#: a killed run loses at most this many steps (a checkpoint of the default run is about 12 MB)
DEFAULT_CHECKPOINT_EVERY = 100
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (``signum``: SIGINT for Ctrl-C, or SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class RunResult:
    out: Path
    steps: int
    timing: dict
    """seconds, iterations, it_per_s and notes of this session (what the log's summary line holds)"""


@contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[list[int]]:
    """While the block runs (training), SIGINT and SIGTERM stop ``trainer`` at the end of its
    current step, so the state it is left in is a whole step's; a second signal interrupts at
    once. Yields the list of signals received. Main thread only (where Python runs handlers)."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            raise Interrupted(signum)
        received.append(signum)
        trainer.stop()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def write_preview(path: Path, image: object) -> None:
    """The latest training render as a PNG, written atomically (a viewer never reads half a file)."""
    import imageio.v3 as iio

    from .export import to_uint8
    from .files import atomic_write

    frame = to_uint8(image)
    atomic_write(path, lambda tmp: iio.imwrite(tmp, frame, extension=".png"))


def read_log(path: Path, up_to_step: int) -> list[dict]:
    """The step rows of a run's ``log.jsonl`` up to ``up_to_step`` (a resumed run's history: the
    rows a killed run logged after its last checkpoint are left out; so is a torn last line)."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= up_to_step:
            rows.append(row)
    return rows


def train(trainer: Trainer, progress: bool) -> None:
    if not progress:
        trainer.run()
        return
    from tqdm import tqdm

    with tqdm(total=trainer.total_steps, initial=trainer.step_count, desc=trainer.prompt[:40], unit="it", dynamic_ncols=True) as bar:
        trainer.callbacks.append(lambda m: (bar.update(1), bar.set_postfix(loss=f"{m['loss']:.3g}", occ=f"{m['occupancy']:.2f}")))
        trainer.run()


def generate(prompt: str, cfg: TrainConfig, export: ExportOptions, out: Path, *, overwrite: bool = False,
             resume_from: Path | None = None, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, threads: int = 0,
             progress: bool = False, stop_on_signal: bool = False, on_message: Callable[[str], object] | None = None) -> RunResult:
    """Train ``prompt`` under ``cfg`` and write the run folder ``out`` (meshes, turntable,
    checkpoint, config, log, preview: :func:`dreamfusion.runs.write_run`).

    ``resume_from``: a checkpoint to continue instead of starting: a stopped run's, in ``out``'s
    staging folder (continued there), or another run's (continued into a new staging folder). Its
    prompt and settings are the run's, but ``cfg.steps`` (the total, at least the checkpoint's)
    and ``cfg.device``. ``overwrite``:
    replace a run already in ``out`` (only once the new one is written). ``stop_on_signal``:
    Ctrl-C and SIGTERM stop training after the current step, write the checkpoint and raise
    :class:`Interrupted`. A ``KeyboardInterrupt`` otherwise leaves the last periodic checkpoint.
    ``on_message``: notes for the user (an unknown word, a skipped step)."""
    from .runs import staged_output, write_config, write_run
    from .trainer import Trainer

    prompt = validate_prompt(prompt)
    validate_config(cfg)
    validate_export(export)
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be 0 (only when stopped) or more steps, got {checkpoint_every}")
    import torch

    if threads:
        torch.set_num_threads(threads)
    messages: list[str] = []

    def note(message: str) -> None:
        messages.append(message)
        if on_message is not None:
            on_message(message)

    # a stopped run continues in its own staging folder; any other checkpoint starts a new one
    in_place = resume_from is not None and Path(resume_from).resolve().parent == staging_folder(out).resolve()
    with staged_output(out, overwrite, resume=in_place) as staging:
        if resume_from is None:
            trainer = Trainer(cfg, prompt, on_message=note)
        else:
            trainer = Trainer.from_checkpoint(resume_from, overrides={"steps": cfg.steps, "device": cfg.device}, on_message=note)
            trainer.history = read_log(Path(resume_from).parent / LOG_FILE, trainer.step_count)
        write_config(trainer, staging, export)  # a stopped run resumes with the export options it was started with
        unknown = trainer.guidance.vocabulary_note(trainer.prompt)
        if unknown:
            note(unknown + ": --guidance stable-diffusion")
        start_step, started, shown_preview = trainer.step_count, time.perf_counter(), []
        with open(staging / LOG_FILE, "w") as log:
            log.writelines(json.dumps(row) + "\n" for row in trainer.history)
            log.flush()

            def keep(metrics: dict) -> None:
                log.write(json.dumps(trainer.history[-1]) + "\n")
                log.flush()
                if "preview" in metrics:  # a first look early, and the object as it forms (every preview_every steps)
                    write_preview(staging / "preview.png", metrics["preview"])
                    if progress and not shown_preview:
                        shown_preview.append(True)
                        print(f"the object as it forms: {staging / 'preview.png'} (every {cfg.preview_every} steps)", file=sys.stderr)
                if checkpoint_every and metrics["step"] % checkpoint_every == 0:
                    trainer.save_checkpoint(staging / CHECKPOINT_FILE)

            trainer.callbacks.append(keep)
            with stop_on_signals(trainer) if stop_on_signal else nullcontext([]) as received:
                train(trainer, progress)
            trainer.callbacks.remove(keep)
        if received:
            trainer.save_checkpoint(staging / CHECKPOINT_FILE)
            raise Interrupted(received[0])
        seconds = time.perf_counter() - started
        done = trainer.step_count - start_step
        timing = {"seconds": seconds, "iterations": trainer.step_count, "it_per_s": done / max(seconds, 1e-9), "notes": messages}
        if resume_from is not None:
            timing["resumed_at"] = start_step
        write_run(trainer, staging, export, timing)
    return RunResult(Path(out), trainer.step_count, timing)
