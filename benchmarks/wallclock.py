"""Command to GLB, as a user waits for it: ``dreamfusion generate PROMPT`` run as a new process for
every prompt of the public list, its wall clock timed from launch to exit (start-up, the prior's
loading, training, export and turntable), its mesh scored against the true object.

    python benchmarks/wallclock.py [--variant NAME=ARGS ...] [--old-repo DIR] [--only 1,9,mug]
                                   [--threads 2] [--out benchmarks/results/wallclock]

Each ``--variant`` is a name and the extra ``generate`` arguments it runs with (for example
``fast=--preset fast``); ``--old-repo DIR`` adds the variant ``old``: the same command run from
another checkout (``git worktree add DIR <commit>``), so old code and new are timed in the same
sitting. The variants run interleaved, prompt by prompt (old 1, new 1, old 2, ...), so that the
machine's changing speed falls on each alike; the report gives each variant's mean seconds, its
ratio to the first variant's, and its quality (mean IoU, R-Precision, colour error), as
``quality.py`` scores them. Writes ``results.csv`` and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from prompts import DEFAULT_PROMPTS, REPO, parse_benchmark, select
from scoring import FAILED_SCORES, score_mesh

from dreamfusion.files import slug


def run_variant(repo: Path, prompt: str, out: Path, threads: int, extra: list[str]) -> tuple[float, str]:
    """Seconds from launch to exit of ``generate`` run from ``repo`` (its own package first on the
    path), and the error's last line ('' when it succeeded)."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    entry = "import sys; from dreamfusion.cli import main; sys.exit(main())"  # the console script, from this checkout
    cmd = [sys.executable, "-c", entry, "generate", prompt, "--out", str(out), "--threads", str(threads), "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return seconds, lines[-1] if lines else f"exit {proc.returncode}"
    return seconds, ""


def training_seconds(log: Path) -> float:
    """The training loop's seconds, from the summary line ``generate`` ends its log with."""
    import json

    for line in reversed(log.read_text().splitlines()):
        row = json.loads(line)
        if "summary" in row:
            return float(row["summary"]["seconds"])
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="a variant of this checkout: its name and extra generate arguments (default: 'default=')")
    ap.add_argument("--old-repo", type=Path, default=None, help="another checkout whose generate (default arguments) runs as 'old'")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--only", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "wallclock")
    args = ap.parse_args(argv)

    import trimesh

    variants: list[tuple[str, Path, list[str]]] = []
    if args.old_repo is not None:
        variants.append(("old", args.old_repo.resolve(), []))
    for text in args.variant or ["default="]:
        name, _, rest = text.partition("=")
        variants.append((name.strip(), REPO, shlex.split(rest)))
    items = select(parse_benchmark(args.prompts), args.only, args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for index, item in items:
        for name, repo, extra in variants:
            folder = args.out / name / f"{index:02d}-{slug(item.prompt, 40)}"
            if folder.exists():
                raise SystemExit(f"error: {folder} exists; choose a new --out")
            seconds, error = run_variant(repo, item.prompt, folder, args.threads, extra)
            row = {"variant": name, "index": index, "prompt": item.prompt, "seconds": round(seconds, 2), "error": error}
            if not error:
                row["train_seconds"] = round(training_seconds(folder / "log.jsonl"), 2)
                mesh = trimesh.load(folder / "mesh.ply", process=False, force="mesh")
                row.update({k: v for k, v in score_mesh(mesh, item).items() if k in ("iou", "colour_error", "hit", "faces")})
            else:
                row.update(FAILED_SCORES)
            rows.append(row)
            print(f"{name:>10} {index:2d} {item.prompt[:28]:<28} {seconds:6.1f} s ({row.get('train_seconds', 0):.1f} training)  "
                  f"IoU {row['iou']:.3f}  "
                  f"{'hit' if row['hit'] else 'MISS'}  colour {row['colour_error']:.3f}  {error}", flush=True)

    with open(args.out / "results.csv", "w", newline="") as f:
        columns = ["variant", "index", "prompt", "seconds", "train_seconds", "iou", "hit", "colour_error", "faces", "error"]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{len(items)} prompts, {args.threads} threads, one at a time, interleaved by prompt",
             "", "| variant | mean s, command to GLB | of which training | ratio to the first | mean IoU | R-Precision | colour err | faces |",
             "|---|---|---|---|---|---|---|---|"]
    base = None
    for name, _, extra in variants:
        mine = [r for r in rows if r["variant"] == name]

        def mean(key: str, mine: list[dict] = mine) -> float:
            return sum(float(r.get(key) or 0) for r in mine) / len(mine)

        base = base or mean("seconds")
        label = name + (f" (`{shlex.join(extra)}`)" if extra else "")
        lines.append(f"| {label} | {mean('seconds'):.1f} | {mean('train_seconds'):.1f} | {mean('seconds') / base:.2f} | "
                     f"{mean('iou'):.3f} | {mean('hit'):.0%} | "
                     f"{mean('colour_error'):.3f} | {mean('faces'):,.0f} |")
    summary = "\n".join(lines)
    (args.out / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
