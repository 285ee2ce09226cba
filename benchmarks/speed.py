"""Speed per stage of a DreamFusion iteration on this machine, with the embedded prior.

    python benchmarks/speed.py [--warmup 150 --iters 30 --threads 1 2 --sizes 32 64 128] [--device cuda]

Prints a table (markdown) of: render forward (and, split by the renderer's named ranges, its
sampling, field, shading, compositing and background stages), guidance (the prior's noise
prediction inside SDS), backward, optimiser, whole iteration and it/s, peak memory per size; the
occupancy grid's speed-up over dense sampling once an object has formed; and the prior's own costs
(one SDS call, sampling one image).

On CUDA every figure waits for the GPU: the whole iteration between two ``torch.cuda.synchronize``
calls, each stage by CUDA events recorded in the stream at the start and end of its range (the
GPU's time for the work launched inside it); peak memory is ``torch.cuda.max_memory_allocated``
per size. On a CPU stages are timed by the wall clock and peak memory is the process's max RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TypeVar
from unittest import mock

import torch

from dreamfusion.cameras import sample_cameras, sample_lights
from dreamfusion.prior.sampling import sample_images
from dreamfusion.trainer import TrainConfig, Trainer

_T = TypeVar("_T")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must wait for it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], _T], n: int, device: torch.device | str = "cpu") -> tuple[float, _T]:
    """Mean seconds of ``n`` calls of ``fn``, the device's work included."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    synchronize(device)
    return (time.perf_counter() - t0) / n, out


class StageClock:
    """Seconds spent in named ranges: by the wall clock on a CPU; on CUDA by a pair of CUDA events
    recorded in the stream at the range's start and end (the GPU's time for the work launched in
    between, read once the device is synchronised by :meth:`totals`)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(name):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._pending.append((name, start, end))
            else:
                t0 = time.perf_counter()
                yield
                self._totals[name] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self._totals[name] += start.elapsed_time(end) / 1e3
            self._pending.clear()
        return dict(self._totals)


@contextlib.contextmanager
def clocked(device: torch.device | str) -> Iterator[StageClock]:
    """The trainer's ``step.*`` and the renderer's ``render.*`` ranges timed by a :class:`StageClock`."""
    import dreamfusion.render
    import dreamfusion.trainer

    clock = StageClock(device)
    with mock.patch.object(dreamfusion.trainer, "record_function", clock.range), \
            mock.patch.object(dreamfusion.render, "record_function", clock.range):
        yield clock


RENDER_STAGES = ("sampling", "field", "shading", "compositing", "background")


def render_stage_times(trainer: Trainer, size: int, iters: int) -> dict:
    """Mean milliseconds of the renderer's own stages (its ``render.*`` ranges) in a forward pass at
    ``size`` on the trainer's device: sampling, field, shading, compositing, background."""
    cfg = trainer.cfg
    g = torch.Generator().manual_seed(2)
    synchronize(trainer.device)
    with clocked(trainer.device) as clock:
        for _ in range(iters):
            cams = sample_cameras(trainer.camera_cfg, cfg.views, g)
            lights = sample_lights(trainer.camera_cfg, cams, g)
            trainer.renderer.render(cams.to(trainer.device), lights.to(trainer.device), size, size, "lit", stratified=True, generator=g)
    totals = clock.totals()
    return {k: totals.get(f"render.{k}", 0.0) * 1e3 / iters for k in RENDER_STAGES}


#: the trainer's own named ranges of one iteration (dreamfusion/trainer.py)
STEP_STAGES = ("render", "guidance", "backward", "optimiser")


def stage_times(trainer: Trainer, size: int, iters: int) -> dict:
    """Mean seconds per stage of ``iters`` real training iterations (``Trainer.step``) at render
    ``size``: the trainer's ``step.*`` ranges, and the whole iteration by wall clock (the device
    synchronised before and after)."""
    trainer.cfg = dataclasses.replace(trainer.cfg, render_size=size, preview_every=0)
    with clocked(trainer.device) as clock:
        synchronize(trainer.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            trainer.step()
        synchronize(trainer.device)
        wall = (time.perf_counter() - t0) / iters
    totals = clock.totals()
    out = {k: totals.get(f"step.{k}", 0.0) / iters for k in STEP_STAGES}
    out["iteration"] = wall
    return out


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device | str) -> float:
    """The device's peak allocated memory since the last :func:`reset_peak_memory` (CUDA), or the
    process's max RSS (a CPU), in MiB."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def size_rows(trainer: Trainer, sizes: list[int], iters: int) -> list[dict]:
    """Per render size: :func:`stage_times` in seconds, ``peak_mib`` (the size's own peak on CUDA)."""
    rows = []
    for size in sizes:
        reset_peak_memory(trainer.device)
        row = {"size": size, **stage_times(trainer, size, iters)}
        row["peak_mib"] = peak_memory_mib(trainer.device)
        rows.append(row)
    return rows


#: the iteration of the defaults before the speed work, beside today's: (label, iterations, views a step, U-Net precision setting)
OLD_AND_NEW = (("old defaults: 1,200 iterations of 2 views, float32 U-Net", 1200, 2, "off"),
               (f"new defaults: {TrainConfig().steps:,} iterations of {TrainConfig().views} views, bfloat16 U-Net where the CPU has it",
                TrainConfig().steps, TrainConfig().views, "auto"))


def old_and_new(trainer: Trainer, iters: int) -> None:
    """The stage table of the old defaults beside the new, on the same scene and threads, and what
    each iteration count makes of it (the start-up and export: benchmarks/wallclock.py)."""
    print(f"\nold defaults beside new, {torch.get_num_threads()} threads, 64 px, the same scene:\n")
    print("| defaults | render fwd ms | guidance ms | backward ms | optimiser ms | iteration ms | iterations | training s |")
    print("|---|---|---|---|---|---|---|---|")
    guidance_cfg, views = trainer.guidance.cfg, trainer.cfg.views
    for label, steps, step_views, precision in OLD_AND_NEW:
        trainer.guidance.cfg = dataclasses.replace(guidance_cfg, cpu_bfloat16=precision)
        trainer.cfg = dataclasses.replace(trainer.cfg, views=step_views)
        stage_times(trainer, 64, 3)  # trace the graph of this precision and batch before timing
        t = stage_times(trainer, 64, iters)
        print(f"| {label} | {t['render'] * 1e3:.0f} | {t['guidance'] * 1e3:.0f} | {t['backward'] * 1e3:.0f} | {t['optimiser'] * 1e3:.1f} | "
              f"{t['iteration'] * 1e3:.0f} | {steps} | {steps * t['iteration']:.0f} |", flush=True)
    trainer.guidance.cfg = guidance_cfg
    trainer.cfg = dataclasses.replace(trainer.cfg, views=views)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=150, help="iterations to form an object before timing")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} was asked for but torch sees no CUDA GPU", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {name}, {torch.get_num_threads()} torch threads available, torch {torch.__version__}, device {args.device}")
    torch.set_num_threads(max(args.threads))
    trainer = Trainer(TrainConfig(steps=args.warmup + 10, preview_every=0, device=args.device), "a red cube")
    trainer.run(args.warmup)
    print(f"after {args.warmup} warm-up iterations: occupancy {trainer.renderer.occupancy_fraction():.3f} of the grid\n")

    peak = "peak GPU MiB" if device.type == "cuda" else "max RSS MiB"
    print(f"| threads | render px | render fwd ms | guidance ms | backward ms | optimiser ms | iteration ms | it/s | {peak} |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for t in size_rows(trainer, args.sizes, args.iters):
            size = t["size"]
            parts = render_stage_times(trainer, size, max(3, args.iters // 2))
            rows.append((threads, size, parts))
            print(f"| {threads} | {size} | {t['render'] * 1e3:.0f} | {t['guidance'] * 1e3:.0f} | {t['backward'] * 1e3:.0f} | "
                  f"{t['optimiser'] * 1e3:.1f} | {t['iteration'] * 1e3:.0f} | {1 / t['iteration']:.1f} | {t['peak_mib']:.0f} |", flush=True)
    print("\nthe render forward by stage (the renderer's `render.*` ranges, ms):\n")
    print("| threads | render px | " + " | ".join(RENDER_STAGES) + " |")
    print("|---|---|" + "---|" * len(RENDER_STAGES))
    for threads, size, parts in rows:
        print(f"| {threads} | {size} | " + " | ".join(f"{parts[k]:.1f}" for k in RENDER_STAGES) + " |")
    torch.set_num_threads(max(args.threads))
    old_and_new(trainer, args.iters)

    cams = sample_cameras(trainer.camera_cfg, 2, torch.Generator().manual_seed(3))
    lights = sample_lights(trainer.camera_cfg, cams, torch.Generator().manual_seed(3))
    cams_d, lights_d = cams.to(device), lights.to(device)
    r = trainer.renderer
    sampler = r.cfg.sampler

    def render_fb():
        out = r.render(cams_d, lights_d, 64, 64, "lit")
        out["image"].mean().backward()
        return out["n_samples"]

    r.cfg.sampler = "auto"
    t_occ, n_occ = timed(render_fb, 5, device)
    r.cfg.sampler = "dense"
    t_dense, n_dense = timed(render_fb, 5, device)
    r.cfg.sampler = sampler
    print(f"\nrender forward+backward, 2 views at 64 px: occupancy grid ({r._sampler(device)} sampler) {t_occ * 1e3:.0f} ms ({n_occ} samples), "
          f"dense {t_dense * 1e3:.0f} ms ({n_dense} samples): speed-up {t_dense / t_occ:.1f}x")

    g = trainer.guidance
    from dreamfusion.guidance import RenderBatch

    cams = sample_cameras(trainer.camera_cfg, 2, torch.Generator().manual_seed(0))
    batch = RenderBatch(torch.rand(2, 3, 64, 64, device=device), torch.rand(2, 1, 64, 64, device=device), cams.to(device),
                        sample_lights(trainer.camera_cfg, cams).to(device), ["lit", "lit"])
    t_sds, _ = timed(lambda: g.sds_loss(batch, ["a red cube, front view"] * 2, (0.02, 0.98), torch.Generator().manual_seed(4)), 10, device)
    print(f"one SDS guidance call (2 views): {t_sds * 1e3:.0f} ms")
    if hasattr(g, "unet") and hasattr(g, "prior_cfg"):
        t_sample, _ = timed(lambda: sample_images(g.unet, g.prior_cfg, g.encoder, ["a red cube, front view"], [0], steps=40), 2, device)
        print(f"sampling one image from the prior (40 DDIM steps, guidance): {t_sample * 1e3:.0f} ms")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
