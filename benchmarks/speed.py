"""Speed per stage of a DreamFusion iteration on this machine, with the embedded prior.

    python benchmarks/speed.py [--warmup 150 --iters 30 --threads 1 2 --sizes 32 64 128]

Prints a table (markdown) of: render forward (and, split by the renderer's profiler ranges,
its sampling, field, shading, compositing and background stages), guidance (the prior's noise prediction inside SDS), backward,
optimiser, whole iteration and
it/s, peak memory; the occupancy grid's speed-up over dense sampling once an object has formed;
and the prior's own costs (one SDS call, sampling one image).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from dreamfusion.cameras import sample_cameras, sample_lights
from dreamfusion.prior.sampling import sample_images
from dreamfusion.trainer import TrainConfig, Trainer

_T = TypeVar("_T")


def timed(fn: Callable[[], _T], n: int) -> tuple[float, _T]:
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    return (time.perf_counter() - t0) / n, out


RENDER_STAGES = ("sampling", "field", "shading", "compositing", "background")


def render_stage_times(trainer: Trainer, size: int, iters: int) -> dict:
    """Mean milliseconds of the renderer's own stages (its ``render.*`` profiler ranges) in a
    forward pass at ``size``: sampling, field, shading, compositing, background."""
    cfg = trainer.cfg
    g = torch.Generator().manual_seed(2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            cams = sample_cameras(trainer.camera_cfg, cfg.views, g)
            lights = sample_lights(trainer.camera_cfg, cams, g)
            trainer.renderer.render(cams, lights, size, size, "lit", stratified=True, generator=g)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("render.")}
    return {k: totals.get(f"render.{k}", 0.0) / 1e3 / iters for k in RENDER_STAGES}


#: the trainer's own profiler ranges of one iteration (dreamfusion/trainer.py)
STEP_STAGES = ("render", "guidance", "backward", "optimiser")


def stage_times(trainer: Trainer, size: int, iters: int) -> dict:
    """Mean seconds per stage of ``iters`` real training iterations (``Trainer.step``) at render
    ``size``: the trainer's ``step.*`` profiler ranges, and the whole iteration by wall clock."""
    trainer.cfg = dataclasses.replace(trainer.cfg, render_size=size, preview_every=0)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            trainer.step()
    wall = (time.perf_counter() - t0) / iters
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("step.")}
    out = {k: totals.get(f"step.{k}", 0.0) / 1e6 / iters for k in STEP_STAGES}
    out["iteration"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=150, help="iterations to form an object before timing")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available, "
          f"torch {torch.__version__}, device {args.device}")
    torch.set_num_threads(max(args.threads))
    trainer = Trainer(TrainConfig(steps=args.warmup + 10, preview_every=0, device=args.device), "a red cube")
    trainer.run(args.warmup)
    print(f"after {args.warmup} warm-up iterations: occupancy {trainer.renderer.occupancy_fraction():.3f} of the grid\n")

    print("| threads | render px | render fwd ms | guidance ms | backward ms | optimiser ms | iteration ms | it/s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            t = stage_times(trainer, size, args.iters)
            parts = render_stage_times(trainer, size, max(3, args.iters // 2))
            rows.append((threads, size, parts))
            print(f"| {threads} | {size} | {t['render'] * 1e3:.0f} | {t['guidance'] * 1e3:.0f} | {t['backward'] * 1e3:.0f} | "
                  f"{t['optimiser'] * 1e3:.1f} | {t['iteration'] * 1e3:.0f} | {1 / t['iteration']:.1f} |", flush=True)
    print("\nthe render forward by stage (torch profiler ranges `render.*`, ms; the profiler adds a little):\n")
    print("| threads | render px | " + " | ".join(RENDER_STAGES) + " |")
    print("|---|---|" + "---|" * len(RENDER_STAGES))
    for threads, size, parts in rows:
        print(f"| {threads} | {size} | " + " | ".join(f"{parts[k]:.1f}" for k in RENDER_STAGES) + " |")
    torch.set_num_threads(max(args.threads))

    cams = sample_cameras(trainer.camera_cfg, 2, torch.Generator().manual_seed(3))
    lights = sample_lights(trainer.camera_cfg, cams, torch.Generator().manual_seed(3))
    r = trainer.renderer
    sampler = r.cfg.sampler

    def render_fb():
        out = r.render(cams, lights, 64, 64, "lit")
        out["image"].mean().backward()
        return out["n_samples"]

    r.cfg.sampler = "torch"
    t_occ, n_occ = timed(render_fb, 5)
    r.cfg.sampler = "dense"
    t_dense, n_dense = timed(render_fb, 5)
    r.cfg.sampler = sampler
    print(f"\nrender forward+backward, 2 views at 64 px: occupancy grid {t_occ * 1e3:.0f} ms ({n_occ} samples), "
          f"dense {t_dense * 1e3:.0f} ms ({n_dense} samples): speed-up {t_dense / t_occ:.1f}x")

    g = trainer.guidance
    from dreamfusion.guidance import RenderBatch

    cams = sample_cameras(trainer.camera_cfg, 2, torch.Generator().manual_seed(0))
    batch = RenderBatch(torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 64), cams, sample_lights(trainer.camera_cfg, cams), ["lit", "lit"])
    t_sds, _ = timed(lambda: g.sds_loss(batch, ["a red cube, front view"] * 2, (0.02, 0.98)), 10)
    print(f"one SDS guidance call (2 views): {t_sds * 1e3:.0f} ms")
    if hasattr(g, "unet") and hasattr(g, "prior_cfg"):
        t_sample, _ = timed(lambda: sample_images(g.unet, g.prior_cfg, g.encoder, ["a red cube, front view"], [0], steps=40), 2)
        print(f"sampling one image from the prior (40 DDIM steps, guidance): {t_sample * 1e3:.0f} ms")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
