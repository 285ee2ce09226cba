"""Export settings measured on trained scenes: every run folder of RUNS exported again with each
variant of the export options, the meshes scored against the world's truth and against the field's
own renders. No training and no prior: the scenes are the runs' checkpoints.

    python benchmarks/export_ab.py RUNS --out OUT --variant NAME="OPTIONS" [--variant ...]
                                   [--prompts FILE] [--only NN-slug,...] [--views 8] [--view-size 128]
                                   [--threads 1] [--device cpu] [--overwrite]

    python benchmarks/export_ab.py runs/ --out /tmp/ab --variant base="" \\
        --variant refined="--export.refine-steps 3" \\
        --variant asset="--export.refine-steps 3 --export.faces 20000 --export.colour-smoothing 3"

RUNS holds run folders as ``dreamfusion generate`` writes them (``RUNS/NN-slug/`` with
``checkpoint.safetensors`` and ``config.json``; for a quality benchmark run with ``--turntables``,
pass its ``OUT/meshes``). A run's benchmark prompt is the one of ``--prompts`` equal to the prompt
in its ``config.json`` (or, without one, its checkpoint's); runs of other prompts are left out with
a note. OPTIONS are ``dreamfusion export``'s ``--export.*`` options, parsed by the same typed
``ExportOptions`` and checked by ``validate_export``: a misspelt option is one ``error:`` line. Each
variant starts from ``dreamfusion export``'s defaults without the turntable (``--export.video
none``; a variant may turn it on, and its time then counts).

Per run and variant the export is written to ``OUT/VARIANT/NN-slug/`` and timed (the surface level,
marching cubes, the asset steps and writing the files), and the mesh is scored as the quality
benchmark scores it (``scoring.score_mesh``: IoU, R-Precision, colour error, the surface measures,
faces), with the size of its ``mesh.glb``. What you see is what you export: the mesh rendered with
its vertex colours (``dreamfusion.mesh_render``, albedo) from ``--views`` cameras around the object
(elevation 20 degrees, azimuths evenly spaced from the contact sheet's 30) against the field's
albedo render of the same views: the silhouettes' IoU (mesh coverage against the field's opacity >
0.5) and the mean colour difference where both cover (``dreamfusion.metrics.render_match``).

Prints a row per export as it finishes, then the means per variant (a failed export counts as a
miss, as in the quality benchmark); writes ``OUT/results.csv`` and ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prompts import DEFAULT_PROMPTS, BenchmarkPrompt, parse_benchmark
from scoring import score_mesh, summarize
from tables import write_csv

from dreamfusion.config import ExportOptions

if TYPE_CHECKING:
    import torch

    from dreamfusion.cameras import Cameras
    from dreamfusion.render import Renderer

#: a variant's name is its folder's
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VIEW_ELEVATION = 20.0
FIRST_AZIMUTH = 30.0


# ----------------------------------------------------------------------------- variants


def base_options() -> ExportOptions:
    """What a variant starts from: ``dreamfusion export``'s defaults without the turntable."""
    return ExportOptions(video="none")


@dataclass
class _VariantArgs:
    export: ExportOptions = field(default_factory=base_options)


def _tyro_error(text: str) -> str:
    """The message of one of tyro's boxed errors, in a line: its first line of text after the title,
    and its first suggestion where it has one."""
    lines = [line.strip(" │╭╮╰╯") for line in text.splitlines()]
    lines = [line for line in lines if line.strip("─- ") and not line.startswith("For full helptext")]
    if not lines:
        return "could not parse the options"
    message = lines[1] if len(lines) > 1 else lines[0]
    if "Perhaps you meant:" in lines:
        suggestion = lines[lines.index("Perhaps you meant:") + 1:][:1]
        if suggestion:
            message += f" (did you mean {suggestion[0].split()[0]}?)"
    return message


@dataclass(frozen=True)
class Variant:
    name: str
    options: str
    """its --export.* options as given"""
    export: ExportOptions


def parse_variant(text: str) -> Variant:
    """'NAME=--export.refine-steps 3 ...' -> the variant, its options parsed as ``dreamfusion export``
    parses them (tyro, on the typed ``ExportOptions``) and checked (``validate_export``). Any
    mistake is a ``ValueError`` in one line, naming the variant."""
    import tyro

    from dreamfusion.config import validate_export

    name, sep, options = text.partition("=")
    name = name.strip()
    if not sep or not VARIANT_NAME.match(name):
        raise ValueError(f"--variant expects NAME=OPTIONS with a NAME of letters, digits, '.', '_' or '-', got {text!r}")
    try:
        args = shlex.split(options)
    except ValueError as exc:
        raise ValueError(f"--variant {name}: {exc}") from None
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            parsed = tyro.cli(_VariantArgs, args=args, prog=f"--variant {name}", add_help=False)
    except SystemExit:
        raise ValueError(f"--variant {name}: {_tyro_error(captured.getvalue())}") from None
    try:
        validate_export(parsed.export)
    except ValueError as exc:
        raise ValueError(f"--variant {name}: {exc}") from None
    return Variant(name, options.strip(), parsed.export)


def parse_variants(texts: list[str]) -> list[Variant]:
    if not texts:
        raise ValueError('give at least one --variant NAME="OPTIONS" (NAME="" for the defaults)')
    variants = [parse_variant(text) for text in texts]
    names = [v.name for v in variants]
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise ValueError(f"--variant {twice[0]} is given twice")
    return variants


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    folder: Path
    index: int
    """the prompt's 1-based place in the benchmark list"""
    item: BenchmarkPrompt

    @property
    def name(self) -> str:
        return self.folder.name


def run_prompt(folder: Path) -> str:
    """The prompt of a run folder: its ``config.json``'s, or without one its checkpoint's."""
    from dreamfusion.checkpoint import CHECKPOINT_FILE, read_checkpoint_info

    config = folder / "config.json"
    if config.is_file():
        try:
            prompt = json.loads(config.read_text()).get("prompt")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{config} is not a run's config.json ({exc})") from None
        if isinstance(prompt, str):
            return prompt
    return read_checkpoint_info(folder / CHECKPOINT_FILE).prompt


def find_runs(folder: Path, items: list[BenchmarkPrompt], only: str | None = None,
              log: Callable[[str], object] = lambda message: print(message, file=sys.stderr)) -> list[Run]:
    """The run folders of ``folder`` (those holding a checkpoint), in name order, each with its
    benchmark prompt; ``only``: comma-separated folder names. Runs whose prompt is not in ``items``
    are left out with a note. ``ValueError`` when none is left."""
    from dreamfusion.checkpoint import CHECKPOINT_FILE

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of runs")
    found = sorted(p.parent for p in folder.glob(f"*/{CHECKPOINT_FILE}") if not p.parent.name.endswith(".partial"))
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        missing = [n for n in names if n not in {p.name for p in found}]
        if missing:
            raise ValueError(f"--only {missing[0]!r} is no run folder of {folder}")
        found = [p for p in found if p.name in names]
    by_prompt = {item.prompt: (index, item) for index, item in enumerate(items, 1)}
    runs = []
    for path in found:
        prompt = run_prompt(path)
        if prompt not in by_prompt:
            log(f"note: {path.name}: {prompt!r} is not a benchmark prompt; left out")
            continue
        runs.append(Run(path, *by_prompt[prompt]))
    if not runs:
        raise ValueError(f"{folder} holds no run folder (NAME/{CHECKPOINT_FILE}) of a benchmark prompt")
    return runs


# ----------------------------------------------------------------------------- renders


def match_cameras(views: int) -> Cameras:
    """The cameras of the render match: ``views`` azimuths evenly spaced from the contact sheet's
    three-quarter view (30 degrees), at its elevation and distance."""
    import torch

    from dreamfusion.cameras import VIEW_DISTANCE, VIEW_FOCAL, make_cameras

    azimuths = FIRST_AZIMUTH + torch.arange(views, dtype=torch.float32) * (360.0 / views)
    return make_cameras(azimuths, VIEW_ELEVATION, VIEW_DISTANCE, VIEW_FOCAL)


def field_albedo(scene: Renderer, cameras: Cameras, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The field's albedo as its renders show it, one view at a time: (B, 3, size, size) colours
    (the albedo composited on black, divided by the opacity) and (B, size, size) opacity, on the CPU."""
    import torch

    from dreamfusion.cameras import default_light

    device = scene.field.density_grid.device
    colours, opacities = [], []
    with torch.no_grad():
        for v in range(len(cameras)):
            cams = cameras[v].to(device)
            out = scene.render(cams, default_light(cams), size, size, mode="albedo", background=torch.zeros(1, 3, device=device))
            opacity = out["opacity"][:, 0]
            colours.append((out["image"] / opacity[:, None].clamp_min(1e-6)).clamp(0, 1).cpu())
            opacities.append(opacity.cpu())
    return torch.cat(colours), torch.cat(opacities)


# ----------------------------------------------------------------------------- one export


def empty_row(run: Run, variant: Variant) -> dict:
    item = run.item
    return {"variant": variant.name, "options": variant.options, "run": run.name, "index": run.index, "prompt": item.prompt, "noun": item.noun,
            "colour": item.colour or "-", "held_out": item.held_out, "asymmetric": item.asymmetric, "status": "error",
            "colour_basis": "named" if item.colour else "parts", "notes": []}


def export_one(scene: Renderer, run: Run, variant: Variant, out: Path, overwrite: bool, cameras: Cameras,
               field_views: tuple[torch.Tensor, torch.Tensor], size: int) -> dict:
    """Export one run's scene with one variant into ``out/variant/run``, time it and score it.
    Never raises for a failure of the export or its scoring: the row says ``status`` 'error' and why."""
    from dreamfusion.mesh_render import render_mesh
    from dreamfusion.metrics import render_match
    from dreamfusion.runs import TEXTURED_GLB, scene_mesh, staged_output, write_export

    row = empty_row(run, variant)
    opts = variant.export
    folder = out / variant.name / run.name
    stage = "export"
    try:
        with staged_output(folder, overwrite) as staging:
            start = time.perf_counter()
            mesh, notes = scene_mesh(scene, opts)
            write_export(scene, mesh, staging, opts)
            row["export_seconds"] = time.perf_counter() - start
        row["notes"] += notes
        row["mesh_folder"] = str(folder)
        for key, name in (("glb_bytes", "mesh.glb"), ("textured_glb_bytes", TEXTURED_GLB)):
            row[key] = (folder / name).stat().st_size if (folder / name).is_file() else None
        stage = "scoring"
        row.update(score_mesh(mesh, run.item))
        stage = "rendering"
        mesh_views = render_mesh(mesh, cameras, size, size, mode="albedo")
        row.update(render_match(mesh_views["coverage"], mesh_views["image"], field_views[1], field_views[0]))
        row["status"] = "ok"
    except Exception as exc:  # one export's failure fails its row only
        row["error"] = f"{stage} failed: {type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
    return row


def report(row: dict) -> None:
    if row["status"] == "ok":
        print(f"[{row['variant']}] {row['run']}: IoU {row['iou']:.3f} {'HIT' if row['hit'] else 'miss'}, colour {row['colour_error']:.3f}, "
              f"surface {row['surface_distance']:.4f}, normals {row['normal_error_median']:.1f}/{row['normal_error_p90']:.1f} deg, "
              f"noise {row['colour_noise']:.3f}, {row['faces']:,} faces, silhouette {row['render_silhouette_iou']:.3f}, "
              f"{row['export_seconds']:.1f} s", flush=True)
    else:
        print(f"[{row['variant']}] {row['run']}: FAILED: {row['error']}", flush=True)


# ----------------------------------------------------------------------------- tables

#: means over the exports that worked, beside scoring.summarize's
EXTRA_MEANS = ("glb_bytes", "export_seconds", "render_silhouette_iou", "render_colour_diff")


def variant_means(rows: list[dict]) -> dict:
    """The means of one variant's rows: :func:`scoring.summarize`'s (a failed export counts as a
    miss in IoU, R-Precision and colour error) and those of :data:`EXTRA_MEANS` over the exports that worked."""
    means = summarize(rows)["all"]
    ok = [r for r in rows if r["status"] == "ok"]
    for key in EXTRA_MEANS:
        values = [r[key] for r in ok if r.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    return means


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def summary_table(variants: list[Variant], means: dict[str, dict]) -> str:
    lines = ["| variant | runs | failed | IoU | R-Precision | colour err | colour err (parts*) | surface dist | normal err median "
             "| normal err p90 | colour noise | faces | GLB KB | export s | silhouette IoU | render colour diff | options |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        s = means[variant.name]
        kilobytes = None if s["glb_bytes"] is None else s["glb_bytes"] / 1000.0
        lines.append(f"| {variant.name} | {s['n']} | {s['failed']} | {_f(s['iou'], '{:.3f}')} | {_f(s['r_precision'], '{:.0%}')} | "
                     f"{_f(s['colour_error'], '{:.3f}')} | {_f(s['colour_error_parts'], '{:.3f}')} | {_f(s['surface_distance'], '{:.4f}')} | "
                     f"{_f(s['normal_error_median'], '{:.1f}')} | {_f(s['normal_error_p90'], '{:.1f}')} | {_f(s['colour_noise'], '{:.3f}')} | "
                     f"{_f(s['faces'], '{:,.0f}')} | {_f(kilobytes, '{:,.0f}')} | {_f(s['export_seconds'], '{:.1f}')} | "
                     f"{_f(s['render_silhouette_iou'], '{:.3f}')} | {_f(s['render_colour_diff'], '{:.3f}')} | `{variant.options or '(defaults)'}` |")
    return "\n".join(lines)


def run_table(rows: list[dict]) -> str:
    lines = ["| variant | run | IoU | hit | colour err | surface dist | normal err median | normal err p90 | colour noise | faces "
             "| GLB KB | export s | silhouette IoU | render colour diff | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['run']} | - | miss | - | - | - | - | - | - | - | - | - | - | "
                         f"FAILED: {r['error'].replace('|', '/')[:120]} |")
            continue
        kilobytes = None if r.get("glb_bytes") is None else r["glb_bytes"] / 1000.0
        star = "*" if r["colour_basis"] == "parts" else ""
        lines.append(f"| {r['variant']} | {r['run']} | {r['iou']:.3f} | {'HIT' if r['hit'] else 'miss'} | {r['colour_error']:.3f}{star} | "
                     f"{r['surface_distance']:.4f} | {r['normal_error_median']:.1f} | {r['normal_error_p90']:.1f} | {r['colour_noise']:.3f} | "
                     f"{r['faces']:,} | {_f(kilobytes, '{:,.0f}')} | {r['export_seconds']:.1f} | {r['render_silhouette_iou']:.3f} | "
                     f"{_f(r['render_colour_diff'], '{:.3f}')} | ok |")
    return "\n".join(lines)


CSV_FIELDS = ("variant", "options", "run", "index", "prompt", "noun", "colour", "held_out", "asymmetric", "status", "iou", "iou_scaled",
              "hit", "colour_error", "colour_basis", "best_other_iou", "best_noun", "surface_distance", "normal_error_median",
              "normal_error_p90", "colour_noise", "faces", "vertices", "glb_bytes", "textured_glb_bytes", "export_seconds",
              "render_silhouette_iou", "render_colour_diff", "mesh_folder", "notes", "error")


def write_summary(path: Path, runs_folder: Path, variants: list[Variant], means: dict[str, dict], rows: list[dict], views: int,
                  view_size: int) -> Path:
    text = (f"# Export variants on the runs of {runs_folder}\n\n"
            f"{len({r['run'] for r in rows})} runs, {views} views of {view_size} px for the render match; "
            "means per variant (a failed export counts as a miss in IoU, R-Precision and colour error; "
            "* colour error against the world's part colours):\n\n"
            f"{summary_table(variants, means)}\n\n## Per run\n\n{run_table(rows)}\n")
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="folder of run folders (NN-slug/checkpoint.safetensors, config.json)")
    ap.add_argument("--out", type=Path, required=True, help="results folder: OUT/VARIANT/NN-slug/, results.csv, summary.md")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="OPTIONS"',
                    help="a name and the --export.* options of dreamfusion export (repeatable; NAME=\"\" for the defaults)")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="benchmark list (default: %(default)s)")
    ap.add_argument("--only", default=None, help="comma-separated run folder names to export")
    ap.add_argument("--views", type=int, default=8, help="cameras of the render match")
    ap.add_argument("--view-size", type=int, default=128, help="pixels per side of the render match's views")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true", help="replace exports already in OUT")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dreamfusion.runs import check_output

    try:
        variants = parse_variants(args.variant)
        if not 1 <= args.views <= 64 or not 16 <= args.view_size <= 1024:
            raise ValueError(f"need 1 to 64 views of 16 to 1024 pixels, got {args.views} of {args.view_size}")
        items = parse_benchmark(args.prompts)
        runs = find_runs(args.runs, items, args.only)
        for variant in variants:
            for run in runs:
                check_output(args.out / variant.name / run.name, args.overwrite)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    import torch

    from dreamfusion.checkpoint import load_scene

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"export variants: {', '.join(v.name for v in variants)} on {len(runs)} runs of {args.runs}; render match on {args.views} views of "
          f"{args.view_size} px, {torch.get_num_threads()} threads", flush=True)
    cameras = match_cameras(args.views)
    rows = []
    for run in runs:
        try:
            scene, _, _ = load_scene(run.folder, args.device)
            field_views = field_albedo(scene, cameras, args.view_size)
        except Exception as exc:  # an unreadable run fails its rows only
            for variant in variants:
                row = empty_row(run, variant)
                row["error"] = f"loading the scene failed: {type(exc).__name__}: {exc}"
                report(row)
                rows.append(row)
            continue
        for variant in variants:
            row = export_one(scene, run, variant, args.out, args.overwrite, cameras, field_views, args.view_size)
            report(row)
            rows.append(row)

    means = {v.name: variant_means([r for r in rows if r["variant"] == v.name]) for v in variants}
    print("\n" + summary_table(variants, means))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "results.csv", CSV_FIELDS)
    write_summary(args.out / "summary.md", args.runs, variants, means, rows, args.views, args.view_size)
    print(f"\nwrote {args.out / 'results.csv'}, {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
