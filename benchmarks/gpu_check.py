"""One command that checks the GPU path and measures it.

    python benchmarks/gpu_check.py [--sd SD_FOLDER] [--if IF_FOLDER] [--steps 300] [--sizes 64 128 256]
    python benchmarks/gpu_check.py --cpu [--steps 20 --sizes 32]     # a dry run of the same code on the CPU

On a CUDA GPU, one row each (a markdown table at the end; progress on stderr):

1. ``tests``: the test suite's ``device``-marked tests on CUDA (``pytest -m device`` with
   DREAMFUSION_TEST_DEVICE=cuda): each compares what the GPU computes with what the CPU does;
2. ``sampler``: nerfacc's CUDA sampler against the PyTorch sampler on the same occupancy grid, with
   the same draws: the number of samples and the image (SKIP where nerfacc's extension cannot be
   built: runs then use the PyTorch sampler);
3. ``embedded``: a ``--steps`` run of the embedded prior on "a red cube" on the GPU and the same
   seed on the CPU: the first step's loss (the same draws, so the same up to rounding), and both
   meshes scored as ``benchmarks/quality.py`` scores them (the GPU's IoU within 0.1 of the CPU's);
4. ``speed N px``: iterations at each ``--sizes`` render size on the formed object, with the device
   synchronised (``benchmarks/speed.py``): it/s, the stages, peak GPU memory;
5. ``stable-diffusion`` / ``deepfloyd-if`` (with ``--sd`` / ``--if`` folders of weights): a
   ``--prior-steps`` run (500) of each on "a red cube": load time, it/s, peak GPU memory, skipped steps.

Exit status 1 if any row FAILs, 2 for bad arguments, 0 otherwise. Without a GPU (and without
``--cpu``) it says so and exits 0: nothing is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dreamfusion.config import TrainConfig
    from dreamfusion.render import Renderer

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

PROMPT = "a red cube"
#: how far the GPU run's IoU may fall below the CPU run's (the same draws, but rounding grows over hundreds of steps)
IOU_TOLERANCE = 0.1
#: the first step's loss on the GPU against the CPU's (TF32 convolutions on recent GPUs round to ~1e-3)
LOSS_RTOL = 2e-2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def row(check: str, device: torch.device, result: str, status: str, seconds: float | None = None, peak: float | None = None) -> dict:
    return {"check": check, "device": str(device), "result": result, "seconds": seconds, "peak_mib": peak, "status": status}


# ----------------------------------------------------------------------------- the samplers


def ball_scene(device: torch.device | str = "cpu", sampler: str = "auto", res: int = 24) -> Renderer:
    """A smooth ball (red on +X) in a grid, its occupancy grid filled in from a seeded generator."""
    from dreamfusion.config import FieldConfig, RenderConfig
    from dreamfusion.field import Background, GridField
    from dreamfusion.render import Renderer

    field = GridField(FieldConfig(resolution=res, bound=1.0, blob_density=0.0))
    axis = torch.linspace(-1.0, 1.0, res)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    with torch.no_grad():
        field.density_grid[0, 0] = (20.0 * (0.5 - (x**2 + y**2 + z**2).sqrt())).clamp(-15.0, 8.0)
        field.albedo_grid[0, 0] = torch.where(x > 0, 2.0, -2.0)
        field.albedo_grid[0, 1:3] = -1.0
    renderer = Renderer(field, Background("white"), RenderConfig(sampler=sampler, occupancy_warmup=1000)).to(device)
    for i in range(8):  # each update looks at one random point per cell; the EMA keeps the maximum
        renderer.update_occupancy(0, force=True, generator=torch.Generator().manual_seed(i))
    return renderer


def compare_samplers(renderer: Renderer, a: str, b: str, size: int = 64, seed: int = 7) -> dict:
    """Render the same views (stratified, the same draws) with sampler ``a`` and ``b`` (nerfacc, torch
    or dense: the names the renderer dispatches on, set on the scene directly, as no config names
    nerfacc's): ``ok`` when the sample counts agree within 0.2% and the images within 2e-3 (largest
    pixel difference)."""
    from dreamfusion.cameras import default_light, make_cameras

    device = renderer.field.density_grid.device
    cams = make_cameras([30.0, 150.0, 260.0], [20.0, -10.0, 60.0], 2.4, 1.0)
    lights = default_light(cams)
    before = renderer.cfg.sampler
    outs = []
    try:
        for sampler in (a, b):
            renderer.cfg.sampler = sampler
            with torch.no_grad():
                outs.append(renderer.render(cams.to(device), lights.to(device), size, size, "lit", stratified=True,
                                            generator=torch.Generator().manual_seed(seed)))
    finally:
        renderer.cfg.sampler = before
    n_a, n_b = outs[0]["n_samples"], outs[1]["n_samples"]
    diff = float((outs[0]["image"] - outs[1]["image"]).abs().max())
    ok = abs(n_a - n_b) <= 0.002 * max(n_a, n_b) and diff <= 2e-3 and n_a > 0
    return {"ok": ok, "samples": (n_a, n_b), "max_image_diff": diff}


def sampler_row(device: torch.device) -> dict:
    from dreamfusion.render import cuda_sampler_available

    t0 = time.perf_counter()
    if device.type == "cuda" and not cuda_sampler_available(device):
        return row("sampler", device, "nerfacc's CUDA extension could not be loaded (a CUDA toolkit builds it on first use, or install a "
                   "prebuilt nerfacc wheel): runs use the PyTorch sampler", "SKIP")
    first = "nerfacc" if device.type == "cuda" else "torch"
    out = compare_samplers(ball_scene(device, "torch", res=32), first, "torch")
    note = "" if device.type == "cuda" else " (dry run: the CUDA sampler needs CUDA, the PyTorch sampler is compared with itself)"
    result = f"{first} vs torch: {out['samples'][0]} vs {out['samples'][1]} samples, largest pixel difference {out['max_image_diff']:.1e}{note}"
    return row("sampler", device, result, "PASS" if out["ok"] else "FAIL", time.perf_counter() - t0)


# ----------------------------------------------------------------------------- runs


def train_and_score(cfg: TrainConfig, out: Path, mesh_resolution: int, first_loss: list | None = None) -> tuple[dict, object]:
    """Train ``cfg`` on :data:`PROMPT`, export the mesh and score it as the quality benchmark does.
    Returns (scores and timings, the trainer)."""
    import trimesh
    from prompts import BenchmarkPrompt
    from quality import score_mesh

    from dreamfusion.runs import ExportOptions, export_scene
    from dreamfusion.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(cfg, PROMPT)
    loaded = time.perf_counter()
    metrics = [trainer.step()]
    if first_loss is not None:
        first_loss.append(metrics[0]["loss"])
    while not trainer.done:
        metrics.append(trainer.step())
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    trained = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    written = export_scene(trainer, out, ExportOptions(formats=("ply",), video="none", mesh_resolution=mesh_resolution))
    mesh = trimesh.load(written["ply"], process=False, force="mesh")
    scores = score_mesh(mesh, BenchmarkPrompt(PROMPT, "cube", "red", False))
    skipped = sum(bool(m["skipped"]) for m in metrics)
    return {**scores, "load_s": loaded - t0, "train_s": trained - loaded, "it_s": len(metrics) / max(trained - loaded, 1e-9),
            "skipped": skipped, "steps": len(metrics), "final_loss": metrics[-1]["loss"]}, trainer


def embedded_rows(device: torch.device, steps: int, mesh_resolution: int, work: Path, sizes: list[int], iters: int) -> list[dict]:
    """The embedded prior on the device against the same seed on the CPU, then speed per size."""
    import speed

    from dreamfusion.config import TrainConfig

    cfg = TrainConfig(steps=steps, preview_every=0)
    rows = []
    try:
        reset_peak(device)
        losses: list[float] = []
        got, trainer = train_and_score(dataclasses.replace(cfg, device=str(device)), work / "device", mesh_resolution, losses)
        peak = peak_mib(device)
        log(f"embedded on {device}: IoU {got['iou']:.3f}, {got['it_s']:.1f} it/s")
        want, _ = train_and_score(dataclasses.replace(cfg, device="cpu"), work / "cpu", mesh_resolution, losses)
        log(f"embedded on cpu: IoU {want['iou']:.3f}, {want['it_s']:.1f} it/s")
        rel = abs(losses[0] - losses[1]) / max(abs(losses[1]), 1e-12)
        ok = rel <= LOSS_RTOL and got["iou"] >= want["iou"] - IOU_TOLERANCE and got["skipped"] == 0
        result = (f"{steps} steps: IoU {got['iou']:.3f} (CPU {want['iou']:.3f}), colour error {got['colour_error']:.3f} "
                  f"(CPU {want['colour_error']:.3f}), {'hit' if got['hit'] else 'miss'}; first step's loss {rel:.1e} from the CPU's; "
                  f"{got['it_s']:.1f} it/s (CPU {want['it_s']:.1f})")
        rows.append(row("embedded", device, result, "PASS" if ok else "FAIL", got["train_s"], peak))
    except Exception as exc:  # noqa: BLE001 - a failed check is a row, the others still run
        rows.append(row("embedded", device, f"{type(exc).__name__}: {exc}", "FAIL"))
        return rows
    for size in sizes:
        try:
            t = speed.size_rows(trainer, [size], iters)[0]
            ok = all(math.isfinite(t[k]) and t[k] >= 0 for k in speed.STEP_STAGES) and t["iteration"] > 0
            result = (f"{1 / t['iteration']:.1f} it/s: render {t['render'] * 1e3:.1f} ms, guidance {t['guidance'] * 1e3:.1f}, "
                      f"backward {t['backward'] * 1e3:.1f}, optimiser {t['optimiser'] * 1e3:.1f} (synchronised)")
            rows.append(row(f"speed {size} px", device, result, "PASS" if ok else "FAIL", t["iteration"] * iters,
                            t["peak_mib"] if device.type == "cuda" else None))
        except Exception as exc:  # noqa: BLE001
            rows.append(row(f"speed {size} px", device, f"{type(exc).__name__}: {exc}", "FAIL"))
    return rows


def prior_row(name: str, folder: str, device: torch.device, steps: int, mesh_resolution: int, work: Path) -> dict:
    """A ``steps`` run of a diffusers prior (its own defaults) on the device: time, memory, health."""
    from dreamfusion.config import GuidanceConfig, TrainConfig
    from dreamfusion.guidance import release_shared

    cfg = TrainConfig(steps=steps, preview_every=0, device=str(device), guidance=GuidanceConfig(name=name, model=folder))
    try:
        reset_peak(device)
        got, trainer = train_and_score(cfg, work / name, mesh_resolution)
        peak = peak_mib(device)
        dtype = str(getattr(trainer.guidance, "dtype", "")).replace("torch.", "")
        ok = got["skipped"] <= 0.05 * got["steps"] and math.isfinite(got["final_loss"])
        result = (f"{got['steps']} steps in {got['train_s']:.0f} s ({got['it_s']:.2f} it/s, {dtype}), load {got['load_s']:.0f} s, "
                  f"{got['skipped']} skipped; IoU {got['iou']:.3f}, {'hit' if got['hit'] else 'miss: ' + got['best_noun']}")
        return row(name, device, result, "PASS" if ok else "FAIL", got["train_s"], peak)
    except Exception as exc:  # noqa: BLE001
        return row(name, device, f"{type(exc).__name__}: {' '.join(str(exc).split())}", "FAIL")
    finally:
        release_shared()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def tests_row(device: torch.device, timeout: float) -> dict:
    """The ``device``-marked tests in a child process on ``device``."""
    env = {**os.environ, "DREAMFUSION_TEST_DEVICE": str(device), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider", str(REPO / "tests")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return row("tests", device, f"pytest -m device did not finish in {timeout:.0f} s", "FAIL", time.perf_counter() - t0)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    if done.returncode != 0:
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        summary = "; ".join(failed[:3] + [summary])
    return row("tests", device, f"pytest -m device: {summary}", "PASS" if done.returncode == 0 else "FAIL", time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the table


def table(rows: list[dict]) -> str:
    out = ["| check | device | status | result | seconds | peak GPU MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        out.append(f"| {r['check']} | {r['device']} | {r['status']} | {r['result']} | {secs} | {peak} |")
    return "\n".join(out)


def environment(device: torch.device) -> str:
    import diffusers
    import nerfacc

    gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    where = (f"{torch.cuda.get_device_name(device)} ({gib:.0f} GiB), CUDA {torch.version.cuda}"
             if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads): a dry run")
    return f"{where}; torch {torch.__version__}, nerfacc {nerfacc.__version__}, diffusers {diffusers.__version__}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run every check on the CPU instead (a dry run of the same code, without a GPU)")
    ap.add_argument("--sd", default=None, metavar="FOLDER", help="Stable Diffusion weights (diffusers layout): add its run")
    ap.add_argument("--if", dest="if_", default=None, metavar="FOLDER", help="DeepFloyd IF stage I weights (diffusers layout): add its run")
    ap.add_argument("--steps", type=int, default=300, help="steps of the embedded prior's run (default: %(default)s)")
    ap.add_argument("--prior-steps", type=int, default=500, help="steps of each --sd / --if run (default: %(default)s)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="render sizes timed (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per size (default: %(default)s)")
    ap.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid of the scored meshes (default: %(default)s)")
    ap.add_argument("--no-tests", action="store_true", help="leave out the device-marked tests")
    ap.add_argument("--tests-timeout", type=float, default=600.0)
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot work (one sentence), or None."""
    for flag, folder in (("--sd", args.sd), ("--if", args.if_)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            return f"{flag} {folder}: no such folder (give a folder of weights in the diffusers layout)"
    for flag, value in (("--steps", args.steps), ("--prior-steps", args.prior_steps), ("--iters", args.iters)):
        if value <= 0:
            return f"{flag} must be positive, got {value}"
    bad = [s for s in args.sizes if not 8 <= s <= 512]
    if bad:
        return f"--sizes must be between 8 and 512 pixels, got {bad[0]}"
    if not 16 <= args.mesh_resolution <= 512:
        return f"--mesh-resolution must be between 16 and 512, got {args.mesh_resolution}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = check_args(args)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_check: no GPU here (torch {torch.__version__} sees no CUDA device; built with CUDA {torch.version.cuda}): nothing was "
              "checked. Run it on a machine with an NVIDIA GPU, or `python benchmarks/gpu_check.py --cpu` for a dry run of the same "
              "checks on the CPU.")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    log(f"gpu_check on {environment(device)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if not args.no_tests:
            log("device-marked tests ...")
            rows.append(tests_row(device, args.tests_timeout))
        log("samplers ...")
        try:
            rows.append(sampler_row(device))
        except Exception as exc:  # noqa: BLE001
            rows.append(row("sampler", device, f"{type(exc).__name__}: {exc}", "FAIL"))
        log(f"embedded prior, {args.steps} steps on {device} and on the CPU ...")
        rows += embedded_rows(device, args.steps, args.mesh_resolution, work / "embedded", args.sizes, args.iters)
        for name, folder in (("stable-diffusion", args.sd), ("deepfloyd-if", args.if_)):
            if folder is not None:
                log(f"{name}, {args.prior_steps} steps ...")
                rows.append(prior_row(name, folder, device, args.prior_steps, args.mesh_resolution, work))
    print(f"gpu_check on {environment(device)}\n")
    print(table(rows))
    failed = [r["check"] for r in rows if r["status"] == "FAIL"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}" + (" (a dry run on the CPU)" if device.type == "cpu" else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
