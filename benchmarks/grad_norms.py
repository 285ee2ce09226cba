"""How hard each loss term pulls on the grids over a run: the gradient norm of every weighted term
(SDS and each regulariser) on the density and the albedo grid.

    python benchmarks/grad_norms.py [--only torus,mug] [--steps 1200] [--every 100] [--seed 0]
                                    [--threads 1] [--prompts FILE] [--set section.key=value ...]

Per prompt of the benchmark list (``--only`` as in ``quality.py``): a ``Trainer`` at the default
settings (then any ``--set``, e.g. ``--set optim.entropy_weight=1`` to see a term that is off by
default) with ``optim.grad_norm_every`` = ``--every``: at those steps the trainer takes one extra
backward per term. Prints a markdown table: per prompt and term, the median norm over the logged
steps on each grid and its ratio to the SDS term's median (a regulariser whose ratio is 1e-5 does
nothing; one near 1 competes with the prior).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from prompts import DEFAULT_PROMPTS, parse_benchmark, select

from dreamfusion.config import apply_overrides

GRIDS = ("density", "albedo")


def summarise(history: list[dict]) -> dict[str, dict[str, float]]:
    """Median over the logged steps of ``history`` (a Trainer's metrics) of each term's gradient
    norm per grid: {term: {grid: median}}, terms in the order first seen. A term absent at a step
    (no gradient there, e.g. orientation in albedo mode) does not count at that step."""
    seen: dict[str, dict[str, list[float]]] = {}
    for row in history:
        for term, norms in row.get("grad_norms", {}).items():
            per = seen.setdefault(term, {g: [] for g in GRIDS})
            for g in GRIDS:
                per[g].append(norms[g])
    return {term: {g: statistics.median(v) for g, v in per.items()} for term, per in seen.items()}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per (prompt, term): medians and their ratio to the SDS term's."""
    lines = ["| prompt | term | density | albedo | density / SDS | albedo / SDS |", "|---|---|---|---|---|---|"]
    for prompt, terms in results.items():
        ref = terms.get("guidance", {g: 0.0 for g in GRIDS})
        for term, med in terms.items():
            ratios = [f"{med[g] / ref[g]:.2g}" if ref[g] > 0 else "-" for g in GRIDS]
            name = "SDS" if term == "guidance" else term
            lines.append(f"| {prompt} | {name} | {med['density']:.3g} | {med['albedo']:.3g} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--only", default="torus,chair,dumbbell,mug")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="", help="a prior folder other than the shipped one")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        from dreamfusion.config import TrainConfig, validate_config, with_settings
        from dreamfusion.trainer import Trainer

        if args.every <= 0:
            raise ValueError(f"--every must be positive, got {args.every}")
        chosen = select(parse_benchmark(args.prompts), args.only)
        cfg = with_settings(TrainConfig(), steps=args.steps, seed=args.seed, model=args.model or None)
        cfg = apply_overrides(cfg, [f"optim.grad_norm_every={args.every}", "preview_every=0", *args.set])
        validate_config(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results = {}
    for _, item in chosen:
        trainer = Trainer(cfg, item.prompt)
        trainer.run()
        results[item.prompt] = summarise(trainer.history)
        print(f"{item.prompt}: {len(trainer.history)} steps", file=sys.stderr, flush=True)
    print(f"gradient norms (median over every {args.every}th step of {args.steps}, seed {args.seed}; "
          f"settings: defaults{''.join(' ' + s for s in args.set)})\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
