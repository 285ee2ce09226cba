"""A batch from end to end: check the input, decide what to run (a rerun skips finished prompts),
run each prompt as a Ray task of :func:`dreamfusion.pipeline.generate`, and write the summary."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import ExportOptions, TrainConfig, config_to_dict, validate_config, validate_export
from ..files import folder_lock
from ..pipeline import DEFAULT_CHECKPOINT_EVERY, generate
from ..runs import staged_output
from . import BatchError
from .manifest import batch_manifest, batch_settings, check_output, prepare_batch_folder, run_complete, run_timing, sees_batch_folder
from .prompts import BatchPrompt
from .summary import BatchResult, contact_sheet, summary_row, write_summary
from .tasks import (
    ClusterOptions,
    Progress,
    TaskOutcome,
    capacity,
    check_resources,
    describe_error,
    node_resources,
    ray_session,
    resource_text,
    run_tasks,
    validate_cluster,
)


@dataclass(frozen=True)
class PromptRun:
    """One prompt's run: what a Ray worker passes to :func:`dreamfusion.pipeline.generate`."""

    prompt: str
    cfg: TrainConfig
    export: ExportOptions
    out: Path
    threads: int = 1
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY


def generate_task(run: PromptRun, batch_out: str, run_id: str) -> dict:
    """One prompt, in a Ray worker: exactly ``dreamfusion generate`` (:func:`dreamfusion.pipeline.generate`),
    into ``run.out`` when this worker sees the batch folder; otherwise into a local temporary folder
    whose files are sent back for the driver to write. Returns the run's timing and, when sent
    back, ``files`` ({relative path: bytes})."""
    def generate_into(out: Path, overwrite: bool) -> None:
        generate(run.prompt, run.cfg, run.export, out, overwrite=overwrite, threads=run.threads, checkpoint_every=run.checkpoint_every)

    if sees_batch_folder(batch_out, run_id):
        generate_into(run.out, overwrite=True)
        return {"timing": run_timing(run.out), "files": None}
    with tempfile.TemporaryDirectory(prefix="dreamfusion-batch-") as tmp:
        local = Path(tmp) / Path(run.out).name
        generate_into(local, overwrite=False)
        files = {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}
        return {"timing": run_timing(local), "files": files}


def write_sent_files(folder: Path, files: dict[str, bytes]) -> Path:
    """A run's files sent back by a worker without the batch folder, staged into place whole."""
    with staged_output(folder, overwrite=True) as staging:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return folder


def run_batch(prompts: Sequence[BatchPrompt], out: Path, cfg: TrainConfig, export: ExportOptions, cluster: ClusterOptions, *,
              threads: int = 0, overwrite: bool = False, prompt_file: str | Path = "", quiet: bool = False,
              checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, on_done: Callable[[dict], None] | None = None,
              log: Callable[[str], object] = print) -> BatchResult:
    """Run a batch: every prompt of ``prompts`` (from :func:`~dreamfusion.batch.prompts.read_prompts`)
    with the settings ``cfg`` (its seed unless a prompt has its own) and ``export`` into
    ``out/<folder>``; prompts whose folder is finished are skipped. Writes ``batch.json``, the
    summary and the contact sheet. ``threads``: torch threads of each run (0: its CPUs).
    ``on_done(row)`` is called as each run finishes.

    Checks everything that can fail on bad input (settings, output folder, cluster, resources)
    before anything is written: those are :class:`BatchError` (or the ``ValueError`` of a setting)."""
    started = time.perf_counter()
    out = Path(out)
    validate_cluster(cluster)
    if cfg.device.startswith("cuda") and not cluster.gpus_per_run:
        raise BatchError(f"device {cfg.device!r} needs --gpus-per-run (Ray gives a run a GPU only when it asks for one)")
    validate_config(dataclasses.replace(cfg, device="cpu"))  # the GPU, if any, is the worker's to check
    validate_export(export)
    seeds = [None if p.error else (p.seed if p.seed is not None else cfg.seed) for p in prompts]
    settings = batch_settings(config_to_dict(cfg), dataclasses.asdict(export))
    manifest = batch_manifest(prompts, seeds, settings, prompt_file)
    with folder_lock(out):
        return _run(prompts, seeds, out, cfg, export, cluster, manifest, threads=threads, overwrite=overwrite, prompt_file=prompt_file,
                    quiet=quiet, checkpoint_every=checkpoint_every, on_done=on_done, log=log, started=started)


def _run(prompts: Sequence[BatchPrompt], seeds: list[int | None], out: Path, cfg: TrainConfig, export: ExportOptions,
         cluster: ClusterOptions, manifest: dict, *, threads: int, overwrite: bool, prompt_file: str | Path, quiet: bool,
         checkpoint_every: int, on_done: Callable[[dict], None] | None, log: Callable[[str], object], started: float) -> BatchResult:
    """:func:`run_batch` once its input is checked, holding the batch folder's lock."""
    action = check_output(out, manifest, overwrite)
    rows: list[dict | None] = [None] * len(prompts)
    todo: list[int] = []
    for i, (p, seed) in enumerate(zip(prompts, seeds, strict=True)):
        if p.error:
            rows[i] = summary_row(p, seed, "failed", error=p.error)
        elif action == "resume" and run_complete(out / p.folder):
            timing = run_timing(out / p.folder)
            rows[i] = summary_row(p, seed, "skipped", timing.get("seconds"), timing.get("iterations"))
        else:
            todo.append(i)
    threads = threads or max(1, math.ceil(cluster.cpus_per_run))
    runs = [PromptRun(prompts[i].prompt, dataclasses.replace(cfg, seed=seeds[i]), export, out / prompts[i].folder, threads, checkpoint_every)
            for i in todo]

    if not todo:  # nothing to run: no need for Ray
        prepare_batch_folder(out, manifest, action)
        log(f"batch: {len(prompts)} prompts, nothing to run")
        return finish_batch(out, rows, False, started, prompt_file, cluster)

    with ray_session(cluster) as ray:
        nodes = node_resources(ray.nodes())
        check_resources(nodes, cluster.cpus_per_run, cluster.gpus_per_run)
        prepare_batch_folder(out, manifest, action)
        skipped = sum(r is not None and r["status"] == "skipped" for r in rows)
        cpus, gpus = sum(c for c, _ in nodes), sum(g for _, g in nodes)
        at_once = cluster.max_parallel or capacity(nodes, cluster.cpus_per_run, cluster.gpus_per_run)
        log(f"batch: {len(prompts)} prompts, {skipped} finished before, {len(prompts) - len(todo) - skipped} that cannot run, "
            f"{len(todo)} to run on {len(nodes)} node(s) with {resource_text(cpus, gpus)} "
            f"({resource_text(cluster.cpus_per_run, cluster.gpus_per_run)} per run, {at_once} at once)")
        for p in prompts:
            if p.error:
                log(f"failed: {p.error}")

        def done(outcome: TaskOutcome) -> None:
            i = todo[outcome.index]
            p, seed = prompts[i], seeds[i]
            folder = out / p.folder
            if outcome.status == "ok":
                try:
                    if outcome.value.get("files") is not None:
                        write_sent_files(folder, outcome.value["files"])
                    timing = outcome.value.get("timing") or run_timing(folder)
                    rows[i] = summary_row(p, seed, "ok", timing.get("seconds"), timing.get("iterations"))
                except Exception as exc:  # the run finished but its files could not be written here
                    rows[i] = summary_row(p, seed, "failed", outcome.seconds, error=f"writing the run failed: {describe_error(exc)}")
            else:
                shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)  # a killed worker's staging
                rows[i] = summary_row(p, seed, outcome.status, outcome.seconds, error=outcome.error)
            if on_done is not None:
                on_done(rows[i])

        progress = Progress(len(todo), quiet=quiet)
        try:
            outcomes = run_tasks(generate_task, [(r, str(out), manifest["run_id"]) for r in runs], cluster, on_done=done,
                                 progress=progress, label=lambda k: repr(prompts[todo[k]].prompt))
        finally:
            progress.close()
        interrupted = False
        for k, outcome in enumerate(outcomes):
            i = todo[k]
            if rows[i] is None and run_complete(out / prompts[i].folder):
                # it finished as the interrupt came (its folder is whole): a finished run, not a cancelled one
                interrupted = True
                rows[i] = summary_row(prompts[i], seeds[i], "ok", outcome.seconds)
            if rows[i] is None:  # cancelled before it started or while running
                interrupted = True
                shutil.rmtree((out / prompts[i].folder).with_name(prompts[i].folder + ".partial"), ignore_errors=True)
                rows[i] = summary_row(prompts[i], seeds[i], "cancelled", error=outcome.error or "interrupted")
            interrupted = interrupted or outcome.status == "cancelled"

    return finish_batch(out, rows, interrupted, started, prompt_file, cluster)


def finish_batch(out: Path, rows: Sequence[dict | None], interrupted: bool, started: float, prompt_file: str | Path,
                 cluster: ClusterOptions) -> BatchResult:
    """The summary files and the contact sheet of a batch that has run (or stopped)."""
    final = [r for r in rows if r is not None]
    result = BatchResult(final, interrupted, time.perf_counter() - started)
    meta = {"prompt_file": str(prompt_file), "out": str(out), "wall_seconds": result.seconds, "interrupted": interrupted,
            "cluster": dataclasses.asdict(cluster)}
    write_summary(out, final, meta)
    contact_sheet(out, final)
    return result


