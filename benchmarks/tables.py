"""What a quality benchmark run reports: the markdown tables (per prompt, and group means), the
rows as ``results.csv``, and the contact sheet (per prompt the true object and the result, lit
and textureless)."""

from __future__ import annotations

import csv
from pathlib import Path

from dreamfusion.contact_sheet import BLACK, GREEN, RED, Tile
from dreamfusion.contact_sheet import contact_sheet as draw_sheet

SHEET_SIZE = 128
SHEET_COLUMNS = ("truth_lit", "truth_textureless", "lit", "textureless")
SHEET_TITLES = ("truth, lit", "truth, textureless", "result, lit", "result, textureless")


def _f(v: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _facing(row: dict) -> str:
    """'IoU (yaw)' of :func:`dreamfusion.metrics.facing_iou`, '-' for a row scored before it existed."""
    if row.get("facing_iou") is None:
        return "-"
    return f"{row['facing_iou']:.3f} ({row['facing_yaw']:+.0f})"


def markdown_table(rows: list[dict]) -> str:
    head = ("| # | prompt | held-out | IoU | IoU scaled | best other | sphere | hit | IoU turned (yaw) | colour err | s | it | status |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["status"] == "ok":
            star = "*" if r["colour_basis"] == "parts" else ""
            lines.append(f"| {r['index']} | {r['prompt']} | {'yes' if r['held_out'] else ''} | {r['iou']:.3f} | {r['iou_scaled']:.3f} | "
                         f"{r['best_other_iou']:.3f} ({r['best_noun'] if r['best_noun'] != r['noun'] else 'self'}) | {r['sphere_iou']:.3f} | "
                         f"{'HIT' if r['hit'] else 'miss'} | {_facing(r)} | "
                         f"{r['colour_error']:.3f}{star} | {_f(r['seconds'], '{:.0f}')} | {r['iterations']} | ok |")
        else:
            err = str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
            lines.append(f"| {r['index']} | {r['prompt']} | {'yes' if r['held_out'] else ''} | - | - | - | - | miss | - | - | "
                         f"{_f(r.get('seconds'), '{:.0f}')} | {r.get('iterations', 0)} | FAILED: {err} |")
    return "\n".join(lines)


def summary_table(summary: dict[str, dict]) -> str:
    """Group means: the scores, then the measures of a clean asset (distance to the true surface,
    normal error median and 90th percentile in degrees, colour noise, faces, mesh file size)."""
    lines = ["| group | n | failed | mean IoU | mean IoU scaled | R-Precision | colour err (named) | colour err (parts*) | best other "
             "| sphere | mean s | surface dist | normal err median | normal err p90 | colour noise | faces | mesh KB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        if not s["n"]:
            continue
        kilobytes = None if s.get("mesh_bytes") is None else s["mesh_bytes"] / 1000.0
        lines.append(f"| {name} | {s['n']} | {s['failed']} | {_f(s['iou'])} | {_f(s['iou_scaled'])} | {_f(s['r_precision'], '{:.0%}')} | "
                     f"{_f(s['colour_error'])} | {_f(s['colour_error_parts'])} | {_f(s['best_other_iou'])} | {_f(s['sphere_iou'])} | "
                     f"{_f(s['seconds'], '{:.0f}')} | {_f(s.get('surface_distance'), '{:.4f}')} | {_f(s.get('normal_error_median'), '{:.1f}')} | "
                     f"{_f(s.get('normal_error_p90'), '{:.1f}')} | {_f(s.get('colour_noise'))} | {_f(s.get('faces'), '{:,.0f}')} | "
                     f"{_f(kilobytes, '{:,.0f}')} |")
    return "\n".join(lines)


CSV_FIELDS = ("index", "prompt", "noun", "colour", "held_out", "asymmetric", "status", "iou", "iou_scaled", "colour_error", "colour_basis",
              "true_iou", "best_other_iou", "best_noun", "sphere_iou", "hit", "facing_iou", "facing_yaw", "seconds", "export_seconds",
              "total_seconds", "iterations", "it_per_s", "vertices", "faces", "surface_distance", "normal_error_median",
              "normal_error_p90", "colour_noise", "mesh_bytes", "clip_r_precision", "clip_r_precision_textureless", "mesh",
              "notes", "error")


def write_csv(rows: list[dict], path: Path, fields: tuple[str, ...] = CSV_FIELDS) -> Path:
    """``rows`` as CSV, the columns ``fields`` (a list, such as a row's notes, joined by '; ')."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("; ".join(r[k]) if isinstance(r.get(k), list) else r.get(k)) for k in fields})
    return path



def contact_sheet(entries: list[dict], path: Path, size: int = SHEET_SIZE) -> Path:
    """Per entry one row: truth lit | truth textureless | result lit | result textureless, with the
    entry's ``label`` and ``score`` under it. ``entries``: dicts with ``label``, ``score``, ``bad``
    (the score in red) and the four images ((3, H, W) tensors in [0, 1], or None: a grey panel)."""
    tiles = []
    for e in entries:
        caption = ((str(e.get("label", "")), BLACK), (str(e.get("score", "")), RED if e.get("bad") else GREEN))
        tiles += [Tile(e.get(key), caption if c == 0 else (), placeholder="no render") for c, key in enumerate(SHEET_COLUMNS)]
    return draw_sheet(tiles, path, columns=len(SHEET_COLUMNS), size=size, titles=SHEET_TITLES)
