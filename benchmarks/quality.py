"""Quality benchmark: generate every prompt of ``shared/world/benchmark.txt`` and score the exported
mesh against the world's true object (``shared/world/SPEC.md``, "Benchmark prompts").

    python benchmarks/quality.py [--prompts FILE] [--only 1,9,mug | --limit N] [--steps 1200] [--seed 0]
                                 [--out benchmarks/results] [--threads 1] [--jobs 2] [--clip CLIP_FOLDER]
    python benchmarks/quality.py --rescore DIR [--prompts FILE] [--only ...] [--out DIR]

Per prompt: a ``Trainer`` with the default ``TrainConfig`` (steps and seed overridden),
``trainer.run()``, then ``runs.export_scene`` writes ``OUT/meshes/NN-slug/mesh.ply``, which is read
back and scored. With ``--jobs 1`` the prompts run one after another in this process; with
``--jobs N`` they are tasks of the batch engine (``dreamfusion.batch.tasks.run_tasks``, the engine of
``dreamfusion batch``): N at once on a local Ray, each with ``--threads`` CPUs (needs
``pip install -e ".[cluster]"``). Scores:

* IoU of the mesh centred on its bounding box (no scaling, no rotation), and IoU after scaling its
  largest extent to the truth's (how much of the miss is size alone);
* colour error (mean absolute RGB difference at the nearest true surface point). Prompts with a
  named colour are scored against it (``colour_basis`` "named": these make the colour target);
  fixed-colour objects ('-') are scored against the world's part colours (``colour_basis``
  "parts", marked * in the table, reported but not part of the target);
* geometric R-Precision: the true object must be the best IoU match of all 16 (``hit``), shown
  beside the best other object's IoU and the free baseline of a centred sphere;
* seconds (training; export separately) and iterations;
* how clean an asset the mesh is: mean distance to the true surface, median and 90th-percentile
  normal error, colour noise within one true part, faces and the file's size (``scoring.py``).

``--rescore DIR`` trains nothing: it scores again the meshes an earlier run left in
``DIR/meshes/NN-slug/mesh.ply`` (the prompt is the list's NN-th, its slug checked), keeping that
run's other columns (times, notes) from ``DIR/results.json`` where it has them, and writes
``results.csv`` and ``results.json`` into ``--out`` (default: DIR itself; the contact sheet is left
as it was). So new measures apply to results already made.

Writes ``results.csv``, ``results.json`` and ``contact_sheet.png`` (per prompt: the true object lit
and textureless, then the result lit and textureless, from the three-quarter view) into ``--out``,
and prints a markdown table, group means (all, seen, held-out, asymmetric) and PASS/MISSED per
target. A prompt whose generation or export fails gets a row with its error and counts as a miss
(IoU 0, no hit, colour error 1, time over the limit).

This file is the runner; the scores are ``scoring.py``, the tables and the contact sheet
``tables.py``, and ``--set`` is :func:`dreamfusion.config.apply_overrides`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from prompts import DEFAULT_PROMPTS, REPO, BenchmarkPrompt, parse_benchmark, select  # noqa: F401 - re-exported for callers
from scoring import evaluate_targets, score_mesh, summarize, true_object
from tables import SHEET_SIZE, contact_sheet, markdown_table, summary_table, write_csv

from dreamfusion.config import apply_overrides
from dreamfusion.files import slug

if TYPE_CHECKING:
    from clip_rprecision import Clip

    from dreamfusion.batch.tasks import TaskOutcome
    from dreamfusion.cameras import Cameras
    from dreamfusion.config import TrainConfig

DEFAULT_OUT = REPO / "benchmarks" / "results"
#: run folders are OUT/meshes/NN-<slug of the prompt, at most this long>
SLUG_LENGTH = 40


# ----------------------------------------------------------------------------- running


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The default TrainConfig with the command line's settings (the same builder and defaults as
    ``dreamfusion generate``: the guidance's own weight unless --cfg), then any --set."""
    from dreamfusion.config import TrainConfig, validate_config, with_settings

    cfg = with_settings(TrainConfig(), steps=args.steps, seed=args.seed, device=args.device, guidance=args.guidance,
                        model=args.model or None, guidance_scale=args.cfg, render_size=args.render_size or None, views=args.views or None)
    extra = []
    if args.grid_resolution:
        extra.append(f"field.resolution={args.grid_resolution}")
    if args.opacity_weight is not None:
        extra.append(f"optim.opacity_weight={args.opacity_weight}")
    cfg = apply_overrides(cfg, extra + list(args.set))
    validate_config(cfg)
    return cfg


def render_truth(item: BenchmarkPrompt, cams: Cameras, size: int) -> dict:
    from dreamfusion.cameras import default_light
    from dreamfusion.prior.data import render_object

    obj = true_object(item)
    return {f"truth_{m}": render_object(obj, cams, default_light(cams), [m] * len(cams), size)[0] for m in ("lit", "textureless")}


def empty_row(index: int, item: BenchmarkPrompt) -> dict:
    """A prompt's row before it has run: status 'error' until it is scored."""
    return {"index": index, "prompt": item.prompt, "noun": item.noun, "colour": item.colour or "-", "held_out": item.held_out,
            "asymmetric": item.asymmetric, "status": "error", "colour_basis": "named" if item.colour else "parts", "iterations": 0,
            "seconds": None, "export_seconds": None, "total_seconds": None, "notes": []}


def sheet_label(index: int, item: BenchmarkPrompt) -> str:
    return f"{index}. {item.prompt}" + (" (held-out)" if item.held_out else "")


def run_prompt(index: int, item: BenchmarkPrompt, cfg: TrainConfig, mesh_resolution: int, out: Path, sheet_size: int = SHEET_SIZE,
               clip_views: Cameras | None = None, log: Callable[[str], object] = print, turntables: bool = False,
               level: str = "silhouette") -> tuple[dict, dict, dict]:
    """Generate, export and score one prompt. Returns (row, contact-sheet entry, CLIP renders).
    Never raises for a failure of the prompt itself: the row says ``status`` 'error' and why."""
    import trimesh

    from dreamfusion.cameras import VIEW_DISTANCE, VIEW_FOCAL, make_cameras
    from dreamfusion.runs import ExportOptions, export_scene, validate_export
    from dreamfusion.trainer import Trainer

    row = empty_row(index, item)
    entry = {"label": sheet_label(index, item)}
    clip_renders: dict = {}
    cams = make_cameras(30.0, 20.0, VIEW_DISTANCE, VIEW_FOCAL)
    try:
        entry.update(render_truth(item, cams, sheet_size))
    except Exception as exc:  # the reference picture is a nicety; never lose the row to it
        row["notes"].append(f"truth render failed: {exc}")
    folder = out / "meshes" / f"{index:02d}-{slug(item.prompt, SLUG_LENGTH)}"
    stage = "generation"
    start = time.perf_counter()
    try:
        trainer = Trainer(cfg, item.prompt, on_message=row["notes"].append)
        trainer.run()
        row["seconds"] = time.perf_counter() - start
        row["iterations"] = trainer.step_count
        row["it_per_s"] = trainer.step_count / max(row["seconds"], 1e-9)
        stage = "export"
        t0 = time.perf_counter()
        opts = ExportOptions(formats=("ply",), video="none", mesh_resolution=mesh_resolution, level=level)
        validate_export(opts)
        folder.mkdir(parents=True, exist_ok=True)
        written = export_scene(trainer, folder, opts)
        row["export_seconds"] = time.perf_counter() - t0
        if turntables:  # for the README; not timed as part of the export
            trainer.save_checkpoint(folder / "checkpoint.safetensors")
            export_scene(trainer, folder, ExportOptions(formats=(), video="gif", video_frames=24, video_size=96, mesh_resolution=32))
        row["total_seconds"] = time.perf_counter() - start
        row["mesh"] = str(written["ply"].relative_to(out))
        row["mesh_bytes"] = written["ply"].stat().st_size
        stage = "rendering"
        for mode in ("lit", "textureless"):
            entry[mode] = trainer.render_views(cams, size=sheet_size, mode=mode)[0]
        if clip_views is not None:
            clip_renders = {mode: trainer.render_views(clip_views, size=sheet_size, mode=mode) for mode in ("lit", "textureless")}
        stage = "scoring"
        mesh = trimesh.load(written["ply"], process=False, force="mesh")
        row.update(score_mesh(mesh, item))
        row["status"] = "ok"
    except Exception as exc:
        if row["seconds"] is None:
            row["seconds"] = time.perf_counter() - start
        row["error"] = f"{stage} failed: {type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
        log(f"  FAILED ({stage}): {type(exc).__name__}: {exc}")
    if row["status"] == "ok":
        entry["score"] = (f"IoU {row['iou']:.2f} (scaled {row['iou_scaled']:.2f})  {'HIT' if row['hit'] else 'miss: ' + row['best_noun']}  "
                          f"col {row['colour_error']:.2f}{'*' if row['colour_basis'] == 'parts' else ''}  {row['seconds']:.0f}s")
        entry["bad"] = not row["hit"]
    else:
        entry["score"] = row["error"][:70]
        entry["bad"] = True
    return row, entry, clip_renders


def _run_job(index: int, item: BenchmarkPrompt, cfg: TrainConfig, mesh_resolution: int, out: Path, sheet_size: int, clip_cams: Cameras | None,
             turntables: bool, level: str = "silhouette", threads: int = 0):
    """One prompt (in a Ray worker under ``--jobs``, with ``threads`` torch threads)."""
    if threads:
        torch.set_num_threads(threads)
    return run_prompt(index, item, cfg, mesh_resolution, out, sheet_size, clip_cams, log=lambda message: None, turntables=turntables, level=level)


def report_row(row: dict) -> None:
    """A prompt's result line, as it finishes."""
    if row["status"] == "ok":
        print(f"[{row['index']}] {row['prompt']}: IoU {row['iou']:.3f} (scaled {row['iou_scaled']:.3f}), best {row['best_noun']} "
              f"{'HIT' if row['hit'] else 'miss'}, colour {row['colour_error']:.3f}, {row['seconds']:.0f} s + export {row['export_seconds']:.0f} s",
              flush=True)
    else:
        print(f"[{row['index']}] {row['prompt']}: FAILED: {row.get('error', '')}", flush=True)


def run_jobs(jobs: list[tuple], parallel: int, threads: int) -> list[tuple[dict, dict, dict]]:
    """The prompts' jobs as tasks of the batch engine (``dreamfusion batch``'s): ``parallel`` at once on
    a local Ray, ``threads`` CPUs each; results in list order. A worker that dies (killed, out of
    memory) fails its prompt's row only; Ctrl-C cancels the rest and ends the benchmark."""
    from dreamfusion.batch.tasks import ClusterOptions, import_ray, ray_session, run_tasks

    import_ray("--jobs above 1")
    cluster = ClusterOptions(cpus_per_run=threads, max_parallel=parallel)
    # workers import this module and prompts.py (by name, or with __main__'s functions) from here
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")) if p)
    def on_done(outcome: TaskOutcome) -> None:
        if outcome.status == "ok":
            report_row(outcome.value[0])

    with ray_session(cluster):
        outcomes = run_tasks(_run_job, [(*job, threads) for job in jobs], cluster, on_done=on_done, runtime_env={"env_vars": {"PYTHONPATH": path}},
                             label=lambda i: f"[{jobs[i][0]}] {jobs[i][1].prompt}")
    if any(o.status == "cancelled" for o in outcomes):
        raise KeyboardInterrupt
    results = []
    for (index, item, *_), outcome in zip(jobs, outcomes, strict=True):
        if outcome.status == "ok":
            results.append(outcome.value)
            continue
        row = empty_row(index, item)
        row["seconds"] = outcome.seconds
        row["error"] = f"generation failed: {outcome.error}"
        report_row(row)
        results.append((row, {"label": sheet_label(index, item), "score": row["error"][:70], "bad": True}, {}))
    return results


def add_clip_scores(rows: list[dict], clip_renders: list[dict], items: list[BenchmarkPrompt], clip: Clip) -> dict:
    """CLIP R-Precision of each successful result among all the benchmark's captions."""
    from clip_rprecision import clip_r_precision

    captions = [it.prompt for it in items]
    out = {}
    for mode, key in (("lit", "clip_r_precision"), ("textureless", "clip_r_precision_textureless")):
        pairs = [(r, c[mode]) for r, c in zip(rows, clip_renders, strict=True) if r["status"] == "ok" and c]
        if not pairs:
            continue
        res = clip_r_precision(clip, [c for _, c in pairs], [captions.index(r["prompt"]) for r, _ in pairs], captions)
        for (r, _), p in zip(pairs, res["per_result"], strict=True):
            r[key] = p
        failed = len(rows) - len(pairs)  # a failed prompt retrieves nothing
        out[mode] = res["r_precision"] * len(pairs) / max(len(rows), 1) if failed else res["r_precision"]
    return out


def rescore(folder: Path, items: list[BenchmarkPrompt], chosen: list[tuple[int, BenchmarkPrompt]],
            log: Callable[[str], object] = print) -> list[dict]:
    """The rows of an earlier run in ``folder``, scored again from its meshes
    (``folder/meshes/NN-slug/mesh.ply``, NN the prompt's 1-based place in ``items``) without
    training: one row per chosen prompt, in list order. A prompt with a mesh gets fresh scores over
    the earlier row's other columns; one without keeps its earlier row (a failure stays a failure)
    or, with none, an error row. ``ValueError`` when ``folder`` holds no meshes or a mesh folder's
    name is not its prompt's (the run used another prompt list)."""
    import trimesh

    meshes = sorted(Path(folder).glob("meshes/*/mesh.ply"))
    if not meshes:
        raise ValueError(f"{folder} holds no meshes/*/mesh.ply to re-score")
    earlier = {}
    results = Path(folder) / "results.json"
    if results.is_file():
        earlier = {row["index"]: row for row in json.loads(results.read_text()).get("rows", [])}
    found = {}
    for path in meshes:
        head = path.parent.name.split("-", 1)[0]
        index = int(head) if head.isdigit() else 0
        if not 1 <= index <= len(items) or path.parent.name != f"{index:02d}-{slug(items[index - 1].prompt, SLUG_LENGTH)}":
            raise ValueError(f"{path.parent.name} is no prompt of {len(items)} in the list by its number and slug: "
                             "re-score with the run's --prompts")
        found[index] = path
    rows = []
    for index, item in chosen:
        row = {**empty_row(index, item), **earlier.get(index, {})}
        if index not in found:
            if index not in earlier:
                row["error"] = "no mesh to re-score"
            rows.append(row)
            continue
        path = found[index]
        try:
            row.update(score_mesh(trimesh.load(path, process=False, force="mesh"), item))
        except Exception as exc:  # one unreadable mesh fails its row only
            row.update(status="error", error=f"scoring failed: {type(exc).__name__}: {exc}")
            log(f"  FAILED (scoring): {type(exc).__name__}: {exc}")
        else:
            row.update(status="ok", mesh=str(path.relative_to(folder)), mesh_bytes=path.stat().st_size)
            row.pop("error", None)
            row.pop("traceback", None)
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="benchmark list (default: %(default)s)")
    ap.add_argument("--only", default=None, help="comma-separated 1-based indices, nouns or prompts to run")
    ap.add_argument("--limit", type=int, default=None, help="run only the first N (of the --only selection)")
    ap.add_argument("--steps", type=int, default=None, help="iterations (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default: {DEFAULT_OUT.relative_to(REPO)}; "
                    "with --rescore, its folder)")
    ap.add_argument("--rescore", type=Path, default=None, metavar="DIR",
                    help="train nothing: score again the meshes an earlier run left in DIR/meshes/*/mesh.ply")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 per worker under --jobs)")
    ap.add_argument("--jobs", type=int, default=1, help="prompts run at once, each a Ray task of the batch engine with --threads CPUs "
                    "(needs the cluster extra; times are then shared-machine times)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--guidance", default="embedded", help="embedded, stable-diffusion, or reference (exact renders of the true "
                    "object instead of a prior: the engine's ceiling)")
    ap.add_argument("--model", default="", help="prior folder (embedded: default assets/prior) or SD folder/hub id")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight (default: the config's)")
    ap.add_argument("--grid-resolution", type=int, default=0, help="density grid per side (default: the config's)")
    ap.add_argument("--render-size", type=int, default=0, help="training render size (default: the config's)")
    ap.add_argument("--views", type=int, default=0, help="cameras per iteration (default: the config's)")
    ap.add_argument("--opacity-weight", type=float, default=None, help="weight of the opacity regulariser (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="any other setting of the run, e.g. --set field.blob_density=5 --set optim.tv_weight=1 (repeatable)")
    ap.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid of the export")
    ap.add_argument("--export-level", default="silhouette", choices=("silhouette", "fixed"),
                    help="how the mesh's surface level is chosen (see ExportOptions.level)")
    ap.add_argument("--turntables", action="store_true", help="also save each scene's checkpoint and a GIF turntable")
    ap.add_argument("--sheet-size", type=int, default=SHEET_SIZE, help="pixels per contact-sheet frame")
    ap.add_argument("--clip", default=None, help="optional: CLIP model folder (or hub id) for CLIP R-Precision")
    ap.add_argument("--clip-views", type=int, default=4, help="views per result for CLIP R-Precision")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        items = parse_benchmark(args.prompts)
        chosen = select(items, args.only, args.limit)
        cfg = build_config(args)
        if args.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {args.jobs}")
        if not 16 <= args.mesh_resolution <= 512:
            raise ValueError(f"mesh resolution must be between 16 and 512, got {args.mesh_resolution}")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.rescore is not None:
        return main_rescore(args, items, chosen)
    clip = clip_cams = None
    if args.clip:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from clip_rprecision import ClipUnavailable, clip_views, load_clip

        try:  # before any generation: a missing model must not cost a benchmark run
            clip = load_clip(args.clip, args.device)
        except ClipUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        clip_cams = clip_views(args.clip_views)
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)

    subset = len(chosen) < len(items)
    print(f"quality benchmark: {len(chosen)} of {len(items)} prompts from {args.prompts}; steps {cfg.steps}, seed {cfg.seed}, "
          f"guidance {cfg.guidance.name} {cfg.guidance.model or '(shipped prior)'}, grid {cfg.field.resolution}, render {cfg.render_size} px, "
          f"mesh {args.mesh_resolution}, {torch.get_num_threads()} threads", flush=True)
    rows, entries, renders = [], [], []
    jobs = [(index, item, cfg, args.mesh_resolution, out, args.sheet_size, clip_cams, args.turntables, args.export_level)
            for index, item in chosen]
    if args.jobs > 1:  # prompts as tasks of the batch engine, one torch thread each by default; results in list order
        print(f"{args.jobs} runs at once on Ray, {args.threads or 1} thread(s) each", flush=True)
        try:
            results = run_jobs(jobs, args.jobs, args.threads or 1)
        except ValueError as exc:  # no Ray, or a machine too small for --threads: one line, before anything ran
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        def one(job: tuple) -> tuple[dict, dict, dict]:
            print(f"[{job[0]}] {job[1].prompt} ...", flush=True)
            result = _run_job(*job)
            report_row(result[0])
            return result

        results = (one(job) for job in jobs)
    for _, (row, entry, clip_renders) in zip(chosen, results, strict=True):
        rows.append(row)
        entries.append(entry)
        renders.append(clip_renders)

    clip_summary = add_clip_scores(rows, renders, items, clip) if clip is not None else {}
    summary = summarize(rows)
    targets = evaluate_targets(rows)

    print_report(rows, summary, targets, subset)
    if clip_summary:
        print(f"\nCLIP R-Precision among the {len(items)} benchmark captions: "
              + ", ".join(f"{mode} {v:.0%}" for mode, v in clip_summary.items()))

    write_csv(rows, out / "results.csv")
    meta = {"prompts": str(args.prompts), "selected": [i for i, _ in chosen], "subset": subset, "steps": cfg.steps, "seed": cfg.seed,
            "threads": (args.threads or 1) if args.jobs > 1 else torch.get_num_threads(), "jobs": args.jobs, "mesh_resolution": args.mesh_resolution,
            "export_level": args.export_level,
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "targets": targets,
                                                  "clip_r_precision": clip_summary}, indent=2, default=str))
    contact_sheet(entries, out / "contact_sheet.png", args.sheet_size)
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'contact_sheet.png'}")
    return 0


def print_report(rows: list[dict], summary: dict, targets: list[dict], subset: bool) -> None:
    print("\n" + markdown_table(rows))
    print("\n* colour error against the world's fixed part colours (not part of the colour target)")
    print("\n" + summary_table(summary))
    print("\ntargets" + (" (SUBSET of the benchmark: not a full result)" if subset else "") + ":")
    for t in targets:
        print(f"  {'PASS  ' if t['passed'] else 'MISSED'} {t['text']}")


def main_rescore(args: argparse.Namespace, items: list[BenchmarkPrompt], chosen: list[tuple[int, BenchmarkPrompt]]) -> int:
    """``--rescore DIR``: the tables of an earlier run's meshes scored again, into ``--out`` (default DIR)."""
    folder = args.rescore
    try:
        rows = rescore(folder, items, chosen)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or folder
    out.mkdir(parents=True, exist_ok=True)
    subset = len(chosen) < len(items)
    summary, targets = summarize(rows), evaluate_targets(rows)
    print(f"re-scored {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} prompts' meshes in {folder}", flush=True)
    print_report(rows, summary, targets, subset)
    meta = {}
    earlier = folder / "results.json"
    if earlier.is_file():
        meta = json.loads(earlier.read_text()).get("meta", {})
    meta.update(rescored_from=str(folder), prompts=str(args.prompts), selected=[i for i, _ in chosen], subset=subset)
    write_csv(rows, out / "results.csv")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "targets": targets}, indent=2, default=str))
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
