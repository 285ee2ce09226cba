"""A batch's prompt list: one prompt a line, or a CSV/TSV table with a seed column; each prompt's
folder name. A line that cannot run carries its error and is reported, not fatal."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import validate_seed
from ..files import slug
from . import BatchError


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of the list: where it came from, its own seed if it has one, the folder it is
    written to (relative to the batch folder) and, for a line that cannot run, why."""

    line: int
    prompt: str
    seed: int | None = None
    folder: str = ""
    error: str | None = None


def _parse_seed(text: str) -> int | None:
    """A line's own seed (None: the batch's), checked as every seed is (:func:`~dreamfusion.config.validate_seed`)."""
    text = text.strip()
    if not text:
        return None
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"seed {text!r} is not a whole number") from None
    return validate_seed(seed)


def _entry(line: int, prompt: str, seed_text: str = "") -> BatchPrompt:
    """A prompt line, normalised like ``dreamfusion generate``'s prompt; a line that cannot run
    carries its error instead of stopping the list."""
    prompt = " ".join(prompt.split())
    try:
        seed = _parse_seed(seed_text)
    except ValueError as exc:
        return BatchPrompt(line, prompt, None, error=f"line {line}: {exc}")
    if not prompt:
        return BatchPrompt(line, prompt, seed, error=f"line {line}: the prompt is empty")
    return BatchPrompt(line, prompt, seed)


def _table_entries(text: str, delimiter: str) -> list[BatchPrompt]:
    """Rows of a CSV/TSV: the first column is the prompt. A first row whose first cell is
    ``prompt`` is a header, and a ``seed`` column then gives seeds; without a header the second
    column, if any, is the seed. Blank rows and rows starting with ``#`` are skipped."""
    entries: list[BatchPrompt] = []
    seed_column: int | None = 1
    header_seen = False
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if not header_seen and not entries:
            header_seen = True
            names = [c.strip().lower() for c in cells]
            if names[0] == "prompt":
                seed_column = names.index("seed") if "seed" in names else None
                continue
        seed_text = cells[seed_column] if seed_column is not None and seed_column < len(cells) else ""
        entries.append(_entry(line, cells[0], seed_text))
    return entries


def assign_folders(entries: Sequence[BatchPrompt]) -> list[BatchPrompt]:
    """Give every runnable prompt a unique folder name: its slug, ``-seed-N`` when the line has its
    own seed, ``-2``, ``-3``... for repeats (in list order, so a rerun of the same list gets the
    same names)."""
    seen: dict[str, int] = {}
    out = []
    for e in entries:
        if e.error is not None:
            out.append(e)
            continue
        base = slug(e.prompt) + (f"-seed-{e.seed}" if e.seed is not None else "")
        seen[base] = seen.get(base, 0) + 1
        out.append(dataclasses.replace(e, folder=base if seen[base] == 1 else f"{base}-{seen[base]}"))
    return out


def read_prompts(path: str | Path) -> list[BatchPrompt]:
    """The prompt list of a batch. ``.csv`` and ``.tsv`` files are tables whose first column is
    the prompt (and may have a ``seed`` column); any other file holds one prompt a line. Blank
    lines and ``#`` comments are skipped. A missing or empty file is a :class:`BatchError`; a
    line with an empty prompt or a bad seed is kept, with its error, to be reported as failed."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"prompt file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchError(f"{path} is not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        entries = _table_entries(text, "," if suffix == ".csv" else "\t")
    else:
        entries = [_entry(n, line) for n, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise BatchError(f"{path} holds no prompts (one a line; blank lines and # comments are skipped)")
    return assign_folders(entries)
