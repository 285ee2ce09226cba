"""The benchmark's prompt lists: ``shared/world/benchmark.txt`` (tab-separated: prompt, noun,
colour or '-', optional 'held-out'), parsed and selected. Shared by ``quality.py`` and
``clip_rprecision.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO.parent / "shared" / "world" / "benchmark.txt"


@dataclass(frozen=True)
class BenchmarkPrompt:
    prompt: str
    noun: str
    colour: str | None  # None: '-' (fixed colours or not scored)
    held_out: bool

    @property
    def asymmetric(self) -> bool:
        from dreamfusion.prior.world import ASYMMETRIC_NOUNS

        return self.noun in ASYMMETRIC_NOUNS


def parse_benchmark(path: str | Path) -> list[BenchmarkPrompt]:
    """Read the tab-separated benchmark: prompt, noun, colour ('-' for none), optional 'held-out'.
    Blank lines and lines starting with '#' are skipped; an unknown noun, colour or flag is an
    error naming the line."""
    from dreamfusion.prior.world import COLOURS, NOUNS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark prompt list not found: {path}")
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) < 3:
            raise ValueError(f"{path}:{lineno}: expected 'prompt<TAB>noun<TAB>colour[<TAB>held-out]', got {line!r}")
        prompt, noun, colour, flags = cols[0], cols[1], cols[2], [c for c in cols[3:] if c]
        if noun not in NOUNS:
            raise ValueError(f"{path}:{lineno}: unknown noun {noun!r}")
        if colour != "-" and colour not in COLOURS:
            raise ValueError(f"{path}:{lineno}: unknown colour {colour!r}")
        unknown = [f for f in flags if f != "held-out"]
        if unknown:
            raise ValueError(f"{path}:{lineno}: unknown flag {unknown[0]!r} (only 'held-out')")
        items.append(BenchmarkPrompt(prompt, noun, None if colour == "-" else colour, "held-out" in flags))
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def select(items: list[BenchmarkPrompt], only: str | None = None, limit: int | None = None) -> list[tuple[int, BenchmarkPrompt]]:
    """(1-based index, prompt) pairs: ``only`` is a comma-separated list of 1-based indices, nouns or
    exact prompts; ``limit`` keeps the first N of those."""
    chosen = list(enumerate(items, 1))
    if only:
        keys = [k.strip() for k in only.split(",") if k.strip()]
        picked = []
        for key in keys:
            match = [(i, it) for i, it in chosen if (key.isdigit() and int(key) == i) or key in (it.noun, it.prompt)]
            if not match:
                raise ValueError(f"--only {key!r} matches no prompt (use 1..{len(items)}, a noun or a prompt)")
            picked += [m for m in match if m not in picked]
        chosen = sorted(picked)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be positive, got {limit}")
        chosen = chosen[:limit]
    return chosen


