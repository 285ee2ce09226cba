"""What a batch leaves besides its runs: ``summary.csv`` and ``summary.json`` (a row a prompt),
the contact sheet, the exit status (the number of failed prompts) and the closing lines."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..contact_sheet import BLACK, GREEN, RED, Tile
from ..contact_sheet import contact_sheet as draw_sheet
from ..files import atomic_write
from .prompts import BatchPrompt

SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
CONTACT_SHEET = "contact_sheet.png"
#: exit statuses: the number of failed prompts, capped below the shell's reserved range
MAX_EXIT_STATUS = 100
INTERRUPTED_EXIT_STATUS = 130


SUMMARY_FIELDS = ("line", "prompt", "seed", "status", "seconds", "iterations", "error", "folder")
STATUSES = ("ok", "skipped", "failed", "cancelled")


def summary_row(p: BatchPrompt, seed: int | None, status: str, seconds: float | None = None, iterations: int | None = None,
                error: str | None = None) -> dict:
    """One prompt's row: status ok (run now), skipped (finished before), failed or cancelled;
    ``folder`` only where a finished run folder exists."""
    return {"line": p.line, "prompt": p.prompt, "seed": seed, "status": status, "seconds": seconds, "iterations": iterations,
            "error": error or "", "folder": p.folder if status in ("ok", "skipped") else ""}


def count_statuses(rows: Sequence[dict]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in rows) for s in STATUSES}


def write_summary(out: Path, rows: Sequence[dict], meta: dict) -> tuple[Path, Path]:
    """``DIR/summary.csv`` and ``DIR/summary.json`` (rows in list order, counts, ``meta``)."""
    out = Path(out)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: "" if r.get(k) is None else r[k] for k in SUMMARY_FIELDS})

    data = {**meta, "counts": count_statuses(rows), "rows": list(rows)}
    return (atomic_write(out / SUMMARY_CSV, write_csv),
            atomic_write(out / SUMMARY_JSON, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str))))


def contact_sheet(out: Path, rows: Sequence[dict], path: Path | None = None, tile: int = 128, columns: int = 6) -> Path:
    """A grid of the batch's results: each finished run's ``preview.png`` (the lit three-quarter
    view ``dreamfusion generate`` writes) over its prompt, and a grey panel with the status for a
    prompt that failed or was cancelled."""
    out = Path(out)
    chars = max(8, tile // 6)
    tiles = []
    for r in rows:
        preview = out / r["folder"] / "preview.png" if r.get("folder") else None
        prompt = r["prompt"] or f"(line {r['line']})"
        finished = r["status"] in ("ok", "skipped")
        detail = r["status"] if not finished else f"seed {r['seed']}" + (
            f", {r['seconds']:.0f} s" if isinstance(r.get("seconds"), (int, float)) else "")
        caption = ((prompt if len(prompt) <= chars else prompt[:chars - 1] + "~", BLACK), (detail[:chars], GREEN if finished else RED))
        tiles.append(Tile(preview if preview is not None and preview.is_file() else None, caption, placeholder=r["status"]))
    return draw_sheet(tiles, path if path is not None else out / CONTACT_SHEET, columns=min(columns, max(1, len(rows))), size=tile)


@dataclass
class BatchResult:
    rows: list[dict]
    interrupted: bool
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        return count_statuses(self.rows)

    @property
    def exit_status(self) -> int:
        """130 when interrupted, else the number of failed prompts (capped at 100; 0: all done)."""
        if self.interrupted:
            return INTERRUPTED_EXIT_STATUS
        return min(self.counts["failed"], MAX_EXIT_STATUS)


def report(result: BatchResult, out: Path) -> str:
    """The closing lines: counts, the failed prompts, the files written, what to do next."""
    c = result.counts
    lines = [f"batch: {c['ok']} done, {c['skipped']} finished before, {c['failed']} failed, {c['cancelled']} cancelled "
             f"in {result.seconds:.0f} s"]
    for r in result.rows:
        if r["status"] == "failed":
            error = r["error"].removeprefix(f"line {r['line']}: ")
            lines.append(f"  failed: line {r['line']} {r['prompt']!r}: {error}")
    lines.append(f"wrote {Path(out) / SUMMARY_CSV}, {Path(out) / SUMMARY_JSON}, {Path(out) / CONTACT_SHEET}")
    if result.interrupted:
        lines.append("interrupted: finished folders are kept; run the same command again to run the rest")
    elif c["failed"]:
        lines.append(f"{c['failed']} prompt(s) failed; fix them and run the same command again (finished prompts are skipped)")
    return "\n".join(lines)
