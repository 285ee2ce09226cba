"""What a prior folder has learned, by the diffusion classifiers of ``dreamfusion.prior.evaluate``.

    python benchmarks/prior_eval.py [FOLDER ...] [--threads 1] [--camera] [--paraphrase] [--images 24] [--colour]

Per folder (default: the shipped prior): its training step, the text classifier (nouns among 16,
colours among 12, held-out pairs apart), and for a camera-aware prior how much its render
conditions lower its loss (``condition_use``: against other renders' cameras and against none) and,
with ``--camera``, the camera classifier on the asymmetric objects (8 azimuths, chance 12.5%;
about a minute on one core). With ``--paraphrase``, the text classifier again on the same renders
with every candidate worded in words and templates never trained on (paraphrase robustness).
Prints a markdown table. With ``--colour``, also the colour that
classifier-free guidance pulls lit renders of the benchmark's coloured objects towards at weights
0, 3, 5 and 10 (``guided_colour``: a weight whose estimate is far from the truth saturates SDS's
albedo). Last, how strongly each prior's first layers read each kind of condition
(``condition_weights``: mean weight norm per input, from the weights alone).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open

from dreamfusion.cameras import RENDER_CONDITION_GROUPS
from dreamfusion.config import ASSET_DIR
from dreamfusion.prior.evaluate import camera_following, condition_use, condition_weights, guided_colour, text_following
from dreamfusion.prior.model import WEIGHTS_FILE, TextEncoder, load_unet


def step_of(folder: Path) -> str:
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        return (f.metadata() or {}).get("step", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, default=[ASSET_DIR])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=24, help="renders for the text classifier")
    ap.add_argument("--camera", action="store_true", help="also run the camera classifier")
    ap.add_argument("--colour", action="store_true", help="also the colour guidance pulls towards, per weight")
    ap.add_argument("--paraphrase", action="store_true", help="also the text classifier with paraphrased candidates")
    ap.add_argument("--camera-seeds", type=int, nargs="+", default=[0], help="seeds of the camera classifier's renders and noise "
                    "(one column pair per seed run; the shipped figures are seeds 0 and 1)")
    ap.add_argument("--noises", type=int, default=1, help="camera classifier: noise draws per timestep (1: the published figures)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, weight_rows = [], []
    for folder in args.folders:
        if not (folder / WEIGHTS_FILE).exists():
            raise SystemExit(f"error: no prior weights at {folder / WEIGHTS_FILE}")
        unet, cfg = load_unet(folder)
        enc = TextEncoder(cfg.max_tokens)
        text = text_following(unet, cfg, enc, n_images=args.images)
        row = [str(folder), step_of(folder), f"{text.noun_accuracy:.0%}", f"{text.colour_accuracy:.0%}",
               f"{text.held_out_noun_accuracy:.0%} / {text.held_out_colour_accuracy:.0%}"]
        if args.paraphrase:
            para = text_following(unet, cfg, enc, n_images=args.images, paraphrase=True)
            row += [f"{para.noun_accuracy:.0%} / {para.colour_accuracy:.0%} "
                    f"(held-out {para.held_out_noun_accuracy:.0%} / {para.held_out_colour_accuracy:.0%})"]
        else:
            row += ["-"]
        if cfg.condition_features or cfg.ray_channels:
            use = condition_use(unet, cfg, enc)
            row += [f"{use.gain_over_shuffled:+.2%}", f"{use.gain_over_dropped:+.2%}"]
            if args.camera:
                cams = [camera_following(unet, cfg, enc, seed=s, noises=args.noises) for s in args.camera_seeds]
                row += [" / ".join(f"{cam.top1:.0%} ({', '.join(f'{k} {v:.0%}' for k, v in cam.per_noun.items())})" for cam in cams),
                        " / ".join(f"{cam.within_45:.0%}" for cam in cams)]
            else:
                row += ["-", "-"]
        else:
            row += ["(text only)", "-", "-", "-"]
        rows.append(row)
        print(" | ".join(row), flush=True)
        w = condition_weights(unet, cfg)
        weight_rows.append([str(folder), step_of(folder), f"{w.image:.3f}", "-" if w.rays is None else f"{w.rays:.3f}", f"{w.text:.3f}"]
                           + [f"{w.features[g]:.3f}" if w.features else "-" for g in RENDER_CONDITION_GROUPS])
    print()
    print("| prior | step | nouns | colours | held-out nouns / colours | paraphrased: nouns / colours | "
          "loss gain: true camera vs another's | vs none | camera top-1 | within 45 deg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nmean weight norm per input of the first layers (conv_in: image and ray-map channels; "
          "class embedding: text and render-condition columns)\n")
    print("| prior | step | image | rays | text | " + " | ".join(RENDER_CONDITION_GROUPS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(RENDER_CONDITION_GROUPS))
    for row in weight_rows:
        print("| " + " | ".join(row) + " |")
    if args.colour:
        for folder in args.folders:
            colour_table(folder)


#: the benchmark's objects with a named colour (the composites have fixed part colours)
COLOURED = (("cube", "red"), ("sphere", "blue"), ("cone", "yellow"), ("cylinder", "orange"), ("pyramid", "purple"),
            ("cube", "green"), ("torus", "blue"), ("chair", "red"), ("mug", "white"), ("mushroom", "red"),
            ("dumbbell", "gray"), ("house", "white"))
WEIGHTS = (0.0, 3.0, 5.0, 10.0)


def colour_table(folder: Path) -> None:
    unet, cfg = load_unet(folder)
    enc = TextEncoder(cfg.max_tokens)
    print(f"\n{folder} (step {step_of(folder)}): colour of the guided estimate of lit true renders at t = 500 "
          "(mean RGB of covered pixels; error: mean |RGB - truth|)\n")
    print("| object | truth | " + " | ".join(f"w = {w:g}" for w in WEIGHTS) + " |")
    print("|---|---|" + "---|" * len(WEIGHTS))
    errors = {w: [] for w in WEIGHTS}
    fmt = lambda c: "(" + ", ".join(f"{v:.2f}" for v in c) + ")"  # noqa: E731
    for noun, colour in COLOURED:
        r = guided_colour(unet, cfg, enc, noun, colour, WEIGHTS)
        cells = []
        for w in WEIGHTS:
            errors[w].append(r.error(w))
            cells.append(f"{fmt(r.estimates[w])} {r.error(w):.3f}")
        print(f"| {colour} {noun} | {fmt(r.truth)} | " + " | ".join(cells) + " |", flush=True)
    print("| **mean error** | | " + " | ".join(f"**{sum(e) / len(e):.3f}**" for e in errors.values()) + " |")


if __name__ == "__main__":
    main()
