"""Many prompts at once: ``dreamfusion batch``, on Ray, on a laptop or a cluster.

A batch is a prompt list and one set of run settings. Each prompt becomes one Ray task that runs
exactly what ``dreamfusion generate`` runs (:func:`dreamfusion.cli.run_generate`) into its own
folder ``DIR/<folder>/``, staged so that a folder that exists is a finished run. That makes a batch
resumable (a rerun skips finished folders), fault-isolated (a failed prompt is one row of the
summary) and safe to interrupt (a cancelled run leaves no folder).

The parts that decide things are pure functions, tested without Ray: reading the prompt list
(:func:`read_prompts`), folder names (:func:`slug`), the manifest that tells this batch from
another (:func:`batch_manifest`, :func:`check_output`), what a cluster can run
(:func:`check_resources`, :func:`capacity`), the summary and the contact sheet. The Ray part is
thin: :func:`ray_session` connects, :func:`run_tasks` runs any function over a list of arguments
with the resources asked for, and :func:`run_batch` ties it together.

Nothing here imports torch or ray at module level: ``dreamfusion --help`` stays instant and the
pure functions work without the ``cluster`` extra.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import config_to_dict
from .files import atomic_write

if TYPE_CHECKING:
    from .cli import Generate

INSTALL_HINT = 'pip install -e ".[cluster]"'
MANIFEST = "batch.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
CONTACT_SHEET = "contact_sheet.png"
#: the files of a finished ``dreamfusion generate`` folder that a batch checks for
RUN_FILES = ("config.json", "log.jsonl", "checkpoint.safetensors", "preview.png")
MAX_SEED = 2**63 - 1
SLUG_LENGTH = 60
#: exit statuses: the number of failed prompts, capped below the shell's reserved range
MAX_EXIT_STATUS = 100
INTERRUPTED_EXIT_STATUS = 130


class BatchError(ValueError):
    """Bad input to a batch (prompt file, output folder, cluster, resources): one line for the user."""


# ----------------------------------------------------------------------------- the prompt list


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of the list: where it came from, its own seed if it has one, the folder it is
    written to (relative to the batch folder) and, for a line that cannot run, why."""

    line: int
    prompt: str
    seed: int | None = None
    folder: str = ""
    error: str | None = None


def slug(text: str, length: int = SLUG_LENGTH) -> str:
    """A folder name for a prompt: lower-case letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "prompt"


def _parse_seed(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"seed {text!r} is not a whole number") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is outside 0..{MAX_SEED}")
    return seed


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


# ----------------------------------------------------------------------------- the manifest


def batch_settings(train: dict, export: dict) -> dict:
    """What makes two batches' runs comparable: every training setting but the seed (a prompt's
    own) and the device (the same run on a GPU is the same batch), and every export option."""
    train = {k: v for k, v in train.items() if k not in ("seed", "device")}
    return json.loads(json.dumps({"train": train, "export": export}, default=str, sort_keys=True))


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def batch_manifest(prompts: Sequence[BatchPrompt], seeds: Sequence[int | None], settings: dict, prompt_file: str | Path = "") -> dict:
    """``DIR/batch.json``: the prompt list (with the seed each runnable prompt runs with), the
    settings, and their hashes. ``seeds``: one per prompt (None for a line that cannot run)."""
    listed = [{"line": p.line, "prompt": p.prompt, "seed": s, "folder": p.folder} for p, s in zip(prompts, seeds, strict=True)]
    return {"version": 1, "prompt_file": str(prompt_file), "prompts_sha256": _digest(listed), "settings_sha256": _digest(settings),
            "run_id": uuid.uuid4().hex, "prompts": listed, "settings": settings}


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def settings_difference(old: dict, new: dict, limit: int = 3) -> str:
    """'steps 4 -> 6, export.video gif -> none' for the first ``limit`` settings that differ."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    parts = [f"{k.removeprefix('train.')} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_output(out: Path, manifest: dict, overwrite: bool) -> str:
    """Decide what to do with the output folder, touching nothing: 'new' (absent or empty),
    'resume' (it holds this batch) or 'replace' (it holds something else and ``overwrite``).

    It holds this batch when its ``batch.json`` has the same settings and every run folder it
    holds belongs to a prompt of the new list with the same prompt and seed: then nothing in it
    can mix with this batch's runs, and a list with lines fixed or added continues where it was.
    Anything else is a :class:`BatchError` unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    hint = "choose another --out or pass --overwrite to replace it"
    path = out / MANIFEST
    try:
        old = json.loads(path.read_text())
        old_settings, old_prompts = old["settings"], old["prompts"]
    except FileNotFoundError:
        if overwrite:
            return "replace"
        raise BatchError(f"output folder {out} is not empty and holds no batch ({MANIFEST} missing); {hint}") from None
    except (OSError, ValueError, KeyError, TypeError):
        if overwrite:
            return "replace"
        raise BatchError(f"output folder {out} holds an unreadable {MANIFEST}; {hint}") from None
    if overwrite:
        return "replace"
    if _digest(old_settings) != manifest["settings_sha256"]:
        raise BatchError(f"output folder {out} holds a batch made with other settings ({settings_difference(old_settings, manifest['settings'])}); "
                         f"{hint}")
    new_runs = {p["folder"]: (p["prompt"], p["seed"]) for p in manifest["prompts"] if p["folder"]}
    for p in old_prompts:
        folder = p.get("folder") or ""
        if folder and (out / folder).is_dir() and new_runs.get(folder) != (p.get("prompt"), p.get("seed")):
            raise BatchError(f"output folder {out} holds another batch: its run {folder}/ ({p.get('prompt')!r}, seed {p.get('seed')}) "
                             f"is not in this prompt list; {hint}")
    return "resume"


def prepare_batch_folder(out: Path, manifest: dict, action: str) -> None:
    """Make the output folder ready: cleared for 'replace', created for 'new'; the manifest
    (re)written for all (it names this invocation, which tells workers whether they see it)."""
    out = Path(out)
    if action == "replace":
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.partial"):  # staging folders of runs killed mid-write: never a result
        shutil.rmtree(stale, ignore_errors=True)
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))


# ----------------------------------------------------------------------------- run folders


def run_complete(folder: Path) -> bool:
    """A finished run folder: runs are staged and moved into place whole, so a folder with the
    files of a run is one (a ``.partial`` staging folder never is)."""
    folder = Path(folder)
    return folder.is_dir() and all((folder / name).is_file() for name in RUN_FILES)


def run_timing(folder: Path) -> dict:
    """The ``summary`` line of a run's ``log.jsonl`` (seconds, iterations, it_per_s, notes), or {}."""
    try:
        lines = (Path(folder) / "log.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}
    return last.get("summary", {}) if isinstance(last, dict) else {}


# ----------------------------------------------------------------------------- the summary


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
    view ``dreamfusion generate`` writes) under its prompt, and a grey panel with the status for a
    prompt that failed or was cancelled."""
    from PIL import Image, ImageDraw

    out = Path(out)
    path = Path(path) if path is not None else out / CONTACT_SHEET
    pad, label_h = 6, 28
    cols = max(1, min(columns, len(rows)))
    nrows = math.ceil(len(rows) / cols) if rows else 1
    sheet = Image.new("RGB", (pad + cols * (tile + pad), pad + nrows * (tile + label_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, tile // 6)
    for i, r in enumerate(rows):
        x = pad + (i % cols) * (tile + pad)
        y = pad + (i // cols) * (tile + label_h + pad)
        preview = out / r["folder"] / "preview.png" if r.get("folder") else None
        if preview is not None and preview.is_file():
            with Image.open(preview) as img:
                sheet.paste(img.convert("RGB").resize((tile, tile), Image.BILINEAR), (x, y))
        else:
            draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(205, 205, 205))
            draw.text((x + 6, y + tile // 2 - 6), r["status"], fill=(150, 0, 0))
        draw.rectangle((x - 1, y - 1, x + tile, y + tile), outline=(180, 180, 180))
        prompt = r["prompt"] or f"(line {r['line']})"
        draw.text((x, y + tile + 2), prompt if len(prompt) <= chars else prompt[:chars - 1] + "~", fill=(0, 0, 0))
        detail = r["status"] if r["status"] not in ("ok", "skipped") else f"seed {r['seed']}" + (
            f", {r['seconds']:.0f} s" if isinstance(r.get("seconds"), (int, float)) else "")
        draw.text((x, y + tile + 14), detail[:chars], fill=(0, 100, 0) if r["status"] in ("ok", "skipped") else (160, 0, 0))
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class ClusterOptions:
    """Where the runs go and what each asks for."""

    address: str | None = None
    """None: start Ray on this machine; 'auto' or 'host:port': join the cluster there; 'ray://host:port': through Ray Client"""
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_parallel: int = 0
    """runs at once (0: as many as the cluster's nodes fit)"""


def validate_cluster(opts: ClusterOptions) -> None:
    if not opts.cpus_per_run > 0:
        raise BatchError(f"--cpus-per-run must be positive, got {opts.cpus_per_run}")
    if opts.gpus_per_run < 0:
        raise BatchError(f"--gpus-per-run must not be negative, got {opts.gpus_per_run}")
    if opts.max_parallel < 0:
        raise BatchError(f"--max-parallel must not be negative (0: as many as fit), got {opts.max_parallel}")
    if opts.address is not None and opts.address != "auto":
        parse_address(opts.address)


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of 'host:port' or 'ray://host:port' (a :class:`BatchError` otherwise)."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BatchError(f"cannot read the Ray address {address!r}: use auto, host:port (e.g. 10.0.0.5:6379) or ray://host:port")
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when nothing listens at a cluster address (Ray itself would retry
    for minutes, logging as it goes)."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise BatchError(f"cannot reach a Ray cluster at {address} ({reason}); start one with `ray start --head` "
                         "or check the address (docs/batch.md)") from None


def import_ray(purpose: str = "this") -> Any:
    """The ray module, or a one-line :class:`BatchError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BatchError(f"{purpose} needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


def _resource_text(cpus: float, gpus: float) -> str:
    n = lambda v: f"{v:g}"
    return f"{n(cpus)} CPU{'s' if cpus != 1 else ''} and " + (f"{n(gpus)} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU")


def node_resources(nodes: Sequence[dict]) -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each live node, from ``ray.nodes()``."""
    return [(float(n.get("Resources", {}).get("CPU", 0.0)), float(n.get("Resources", {}).get("GPU", 0.0)))
            for n in nodes if n.get("Alive", n.get("alive", False))]


def check_resources(nodes: Sequence[tuple[float, float]], cpus: float, gpus: float) -> None:
    """Refuse what the cluster can never run (Ray would wait for it forever): ``nodes`` are the
    (CPUs, GPUs) of each live node; one run needs ``cpus`` and ``gpus`` on one node."""
    ask = f"--cpus-per-run {cpus:g}" + (f" --gpus-per-run {gpus:g}" if gpus else "")
    if not nodes:
        raise BatchError("the Ray cluster has no live node")
    if any(c >= cpus and g >= gpus for c, g in nodes):
        return
    if gpus and not any(g > 0 for _, g in nodes):
        raise BatchError(f"the cluster has no GPU but each run asks for {gpus:g} ({ask}); drop --gpus-per-run or join a cluster with GPUs")
    best = max(nodes, key=lambda cg: (cg[1] >= gpus, cg[0], cg[1]))
    raise BatchError(f"no node of the cluster can give one run {_resource_text(cpus, gpus)} ({ask}): the largest has "
                     f"{_resource_text(*best)}; ask for less per run")


def capacity(nodes: Sequence[tuple[float, float]], cpus: float, gpus: float) -> int:
    """How many runs of ``cpus`` and ``gpus`` the nodes hold at once (at least 1)."""
    total = 0
    for c, g in nodes:
        fit = math.floor(c / cpus + 1e-9)
        if gpus:
            fit = min(fit, math.floor(g / gpus + 1e-9))
        total += max(fit, 0)
    return max(total, 1)


def local_cpus(opts: ClusterOptions, cores: int | None = None) -> int:
    """CPUs a local Ray is started with: the machine's cores, or more when --max-parallel asks for
    more runs at once than fit (they then share the cores, as asked). A run that asks for more
    CPUs than the machine has is not made to fit: :func:`check_resources` refuses it."""
    cores = cores or os.cpu_count() or 1
    if opts.cpus_per_run > cores or not opts.max_parallel:
        return cores
    return max(cores, math.ceil(opts.cpus_per_run * opts.max_parallel))


@contextmanager
def _stderr_captured() -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (Ray's C++ client logs each retry of a
    failing connection there) while connecting; the failure is then told in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _client_token_auth() -> None:
    """Ray Client (ray://) in Ray 2.60 sends the cluster's auth token only when RAY_AUTH_MODE says
    so, though ``ray start`` enables token authentication by default: when a token is at hand
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and no mode is set, use it."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN") or (path and Path(path).is_file()) or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray reads its config once, at import: refresh it, as ray.init does when it enables tokens
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass


@contextmanager
def ray_session(opts: ClusterOptions) -> Iterator[Any]:
    """Ray, connected: an existing session of this process is used as it is (and left running);
    otherwise Ray starts on this machine (no address) or joins the cluster at the address, and is
    shut down at the end. Errors are one-line :class:`BatchError`\\ s."""
    import logging

    ray = import_ray()
    if opts.address not in (None, "auto"):
        probe_address(opts.address)
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if opts.address is None:
        kwargs.update(address="local", num_cpus=local_cpus(opts))
    else:
        kwargs["address"] = opts.address
        if opts.address.startswith("ray://"):
            kwargs.pop("include_dashboard")  # not an option of Ray Client
            _client_token_auth()
    try:
        if opts.address is None:
            ray.init(**kwargs)  # starts Ray's processes, which must keep this process's stderr
        else:
            with _stderr_captured():
                ray.init(**kwargs)
    except Exception as exc:  # Ray's connection errors come in many types; the user needs one line
        message = " ".join(str(exc).split())[:300]
        where = "start Ray on this machine" if opts.address is None else f"connect to the Ray cluster at {opts.address}"
        raise BatchError(f"cannot {where}: {message}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- running tasks


@dataclass
class TaskOutcome:
    """What became of one task: status ok (``value`` is the function's result), failed (``error``
    says why: an exception, a killed worker) or cancelled (interrupted before it finished)."""

    index: int
    status: str
    value: Any = None
    error: str = ""
    seconds: float = 0.0


def describe_error(exc: BaseException) -> str:
    """One line for a task's failure: the exception raised in the task, or what Ray says of the worker."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, type(exc)):
        exc = cause
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:400]


class Progress:
    """The batch's progress bar: done / failed / running with ETA (tqdm), or nothing when quiet."""

    def __init__(self, total: int, quiet: bool = False, desc: str = "batch") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=quiet or total == 0, file=sys.stderr)
        self.done = self.failed = self.running = 0
        self.quiet = quiet

    def update(self, running: int, finished: TaskOutcome | None = None) -> None:
        self.running = running
        if finished is not None:
            self.done += finished.status == "ok"
            self.failed += finished.status != "ok"
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}, running {self.running}", refresh=finished is None)
        if finished is not None:
            self.bar.update(1)

    def write(self, text: str) -> None:
        if not self.quiet:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _cancel(ray: Any, in_flight: dict, grace: float = 10.0) -> dict:
    """Cancel running tasks: first as Ctrl-C inside each (its staging folder is removed as it
    unwinds), then by killing the worker of any that has not stopped after ``grace`` seconds.
    Returns {ref: outcome-or-exception} for each."""
    refs = list(in_flight)
    for ref in refs:
        ray.cancel(ref, force=False)
    done, rest = ray.wait(refs, num_returns=len(refs), timeout=grace)
    for ref in rest:
        ray.cancel(ref, force=True)
    if rest:
        ray.wait(rest, num_returns=len(rest), timeout=grace)
    results = {}
    for ref in refs:
        try:
            results[ref] = ("ok", ray.get(ref, timeout=1.0))
        except BaseException as exc:  # cancelled, killed, or still unkillable: not a result
            results[ref] = ("cancelled", exc)
    return results


def run_tasks(fn: Callable[..., Any], arguments: Sequence[tuple], opts: ClusterOptions, *,
              on_done: Callable[[TaskOutcome], None] | None = None, progress: Progress | None = None,
              runtime_env: dict | None = None, label: Callable[[int], str] | None = None) -> list[TaskOutcome]:
    """Run ``fn(*args)`` for each tuple of ``arguments`` as one Ray task asking for
    ``opts.cpus_per_run`` CPUs and ``opts.gpus_per_run`` GPUs, at most ``opts.max_parallel`` at once
    (default: as many as the cluster's nodes fit). Ray must be connected (:func:`ray_session`).

    Fault isolation: a task that raises, or whose worker dies, is an outcome with status 'failed'
    (tasks are not retried: a batch's rerun is the retry); the others go on. ``on_done`` is called
    in the driver as each finishes (in completion order). Ctrl-C (KeyboardInterrupt) cancels the
    running tasks and leaves the rest undone: their outcomes say 'cancelled'. Returns the outcomes
    in the order of ``arguments``."""
    import ray
    from ray.exceptions import TaskCancelledError

    nodes = node_resources(ray.nodes())
    check_resources(nodes, opts.cpus_per_run, opts.gpus_per_run)
    room = capacity(nodes, opts.cpus_per_run, opts.gpus_per_run)
    window = opts.max_parallel or room
    options: dict[str, Any] = {"num_cpus": opts.cpus_per_run, "num_gpus": opts.gpus_per_run, "max_retries": 0}
    if runtime_env:
        options["runtime_env"] = runtime_env
    remote = ray.remote(fn).options(**options)
    label = label or (lambda i: f"task {i}")

    outcomes: list[TaskOutcome | None] = [None] * len(arguments)
    queue = list(range(len(arguments)))[::-1]
    in_flight: dict[Any, tuple[int, float]] = {}

    def finish(outcome: TaskOutcome) -> None:
        outcomes[outcome.index] = outcome
        if progress is not None:
            progress.update(min(len(in_flight), room), outcome)
            if outcome.status == "failed":
                progress.write(f"failed: {label(outcome.index)}: {outcome.error}")
        if on_done is not None:
            on_done(outcome)

    try:
        while queue or in_flight:
            while queue and len(in_flight) < window:
                i = queue.pop()
                in_flight[remote.remote(*arguments[i])] = (i, time.perf_counter())
            if progress is not None:
                progress.update(min(len(in_flight), room))
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                i, start = in_flight.pop(ref)
                try:
                    outcome = TaskOutcome(i, "ok", ray.get(ref), seconds=time.perf_counter() - start)
                except TaskCancelledError as exc:
                    outcome = TaskOutcome(i, "cancelled", error=describe_error(exc), seconds=time.perf_counter() - start)
                except Exception as exc:  # the task raised, or its worker died: that prompt failed, the batch goes on
                    outcome = TaskOutcome(i, "failed", error=describe_error(exc), seconds=time.perf_counter() - start)
                finish(outcome)
    except KeyboardInterrupt:
        if progress is not None:
            progress.write(f"interrupted: cancelling {len(in_flight)} running task(s)...")
        for ref, (status, value) in _cancel(ray, in_flight).items():
            i, start = in_flight.pop(ref)
            if status == "ok":
                try:
                    finish(TaskOutcome(i, "ok", value, seconds=time.perf_counter() - start))
                except KeyboardInterrupt:  # Ctrl-C again while winding down: the result is kept (finish records it first)
                    pass
            else:
                outcomes[i] = TaskOutcome(i, "cancelled", error="interrupted", seconds=time.perf_counter() - start)
    return [o if o is not None else TaskOutcome(i, "cancelled", error="interrupted") for i, o in enumerate(outcomes)]


# ----------------------------------------------------------------------------- the batch


def sees_batch_folder(out: str | Path, run_id: str) -> bool:
    """Whether this process sees the batch folder the driver prepared (the same machine or a
    shared filesystem): its ``batch.json`` names this invocation."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text()).get("run_id") == run_id
    except (OSError, ValueError, AttributeError):
        return False


def generate_task(run: Generate, out: str, run_id: str) -> dict:
    """One prompt, in a Ray worker: exactly ``dreamfusion generate`` (:func:`dreamfusion.cli.run_generate`),
    into ``run.out`` when this worker sees the batch folder; otherwise into a local temporary folder
    whose files are sent back for the driver to write. Returns the run's timing and, when sent
    back, ``files`` ({relative path: bytes})."""
    from .cli import quiet_libraries, run_generate

    quiet_libraries()
    if sees_batch_folder(out, run_id):
        run_generate(run)
        return {"timing": run_timing(run.out), "files": None}
    with tempfile.TemporaryDirectory(prefix="dreamfusion-batch-") as tmp:
        local = dataclasses.replace(run, out=Path(tmp) / Path(run.out).name, overwrite=False)
        run_generate(local)
        files = {p.relative_to(local.out).as_posix(): p.read_bytes() for p in sorted(local.out.rglob("*")) if p.is_file()}
        return {"timing": run_timing(local.out), "files": files}


def write_sent_files(folder: Path, files: dict[str, bytes]) -> Path:
    """A run's files sent back by a worker without the batch folder, staged into place whole."""
    from .runs import staged_output

    with staged_output(folder, overwrite=True) as staging:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return folder


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


def run_batch(prompts: Sequence[BatchPrompt], out: Path, template: Generate, cluster: ClusterOptions, *, overwrite: bool = False,
              prompt_file: str | Path = "", quiet: bool = False, on_done: Callable[[dict], None] | None = None,
              log: Callable[[str], object] = print) -> BatchResult:
    """Run a batch: every prompt of ``prompts`` (from :func:`read_prompts`) with the settings of
    ``template`` (a ``Generate`` whose prompt, seed, out and overwrite are set per prompt) into
    ``out/<folder>``; prompts whose folder is finished are skipped. Writes ``batch.json``, the
    summary and the contact sheet. ``on_done(row)`` is called as each run finishes.

    Checks everything that can fail on bad input (settings, output folder, cluster, resources)
    before anything is written: those are :class:`BatchError` (or the ``ValueError`` of a setting)."""
    from .cli import train_config
    from .config import validate_config
    from .runs import validate_export

    started = time.perf_counter()
    out = Path(out)
    validate_cluster(cluster)
    cfg = train_config(template)
    device = cfg.device
    if cluster.gpus_per_run and template.device is None and device == "cpu":
        device = "cuda"  # a run that asks Ray for a GPU uses it
    if device.startswith("cuda") and not cluster.gpus_per_run:
        raise BatchError(f"device {device!r} needs --gpus-per-run (Ray gives a run a GPU only when it asks for one)")
    validate_config(dataclasses.replace(cfg, device="cpu"))  # the GPU, if any, is the worker's to check
    validate_export(template.export)
    seeds = [None if p.error else (p.seed if p.seed is not None else cfg.seed) for p in prompts]
    settings = batch_settings(config_to_dict(cfg), dataclasses.asdict(template.export))
    manifest = batch_manifest(prompts, seeds, settings, prompt_file)
    action = check_output(out, manifest, overwrite)

    rows: list[dict | None] = [None] * len(prompts)
    todo: list[int] = []
    for i, (p, seed) in enumerate(zip(prompts, seeds, strict=True)):
        if p.error:
            rows[i] = summary_row(p, seed, "failed", error=p.error)
        elif action == "resume" and run_complete(out / p.folder):
            timing = run_timing(out / p.folder)
            rows[i] = summary_row(p, seed, "skipped", timing.get("seconds"), timing.get("iterations"))
        else:
            todo.append(i)
    threads = template.threads or max(1, math.ceil(cluster.cpus_per_run))
    runs = [dataclasses.replace(template, prompt=prompts[i].prompt, seed=seeds[i], out=out / prompts[i].folder, overwrite=True,
                                quiet=True, threads=threads, device=device) for i in todo]

    if not todo:  # nothing to run: no need for Ray
        prepare_batch_folder(out, manifest, action)
        log(f"batch: {len(prompts)} prompts, nothing to run")
        return finish_batch(out, rows, False, started, prompt_file, cluster)

    with ray_session(cluster) as ray:
        nodes = node_resources(ray.nodes())
        check_resources(nodes, cluster.cpus_per_run, cluster.gpus_per_run)
        prepare_batch_folder(out, manifest, action)
        skipped = sum(r is not None and r["status"] == "skipped" for r in rows)
        cpus, gpus = sum(c for c, _ in nodes), sum(g for _, g in nodes)
        at_once = cluster.max_parallel or capacity(nodes, cluster.cpus_per_run, cluster.gpus_per_run)
        log(f"batch: {len(prompts)} prompts, {skipped} finished before, {len(prompts) - len(todo) - skipped} that cannot run, "
            f"{len(todo)} to run on {len(nodes)} node(s) with {_resource_text(cpus, gpus)} "
            f"({_resource_text(cluster.cpus_per_run, cluster.gpus_per_run)} per run, {at_once} at once)")
        for p in prompts:
            if p.error:
                log(f"failed: {p.error}")

        def done(outcome: TaskOutcome) -> None:
            i = todo[outcome.index]
            p, seed = prompts[i], seeds[i]
            folder = out / p.folder
            if outcome.status == "ok":
                try:
                    if outcome.value.get("files") is not None:
                        write_sent_files(folder, outcome.value["files"])
                    timing = outcome.value.get("timing") or run_timing(folder)
                    rows[i] = summary_row(p, seed, "ok", timing.get("seconds"), timing.get("iterations"))
                except Exception as exc:  # the run finished but its files could not be written here
                    rows[i] = summary_row(p, seed, "failed", outcome.seconds, error=f"writing the run failed: {describe_error(exc)}")
            else:
                shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)  # a killed worker's staging
                rows[i] = summary_row(p, seed, outcome.status, outcome.seconds, error=outcome.error)
            if on_done is not None:
                on_done(rows[i])

        progress = Progress(len(todo), quiet=quiet)
        try:
            outcomes = run_tasks(generate_task, [(r, str(out), manifest["run_id"]) for r in runs], cluster, on_done=done,
                                 progress=progress, label=lambda k: repr(prompts[todo[k]].prompt))
        finally:
            progress.close()
        interrupted = False
        for k, outcome in enumerate(outcomes):
            i = todo[k]
            if rows[i] is None and run_complete(out / prompts[i].folder):
                # it finished as the interrupt came (its folder is whole): a finished run, not a cancelled one
                interrupted = True
                rows[i] = summary_row(prompts[i], seeds[i], "ok", outcome.seconds)
            if rows[i] is None:  # cancelled before it started or while running
                interrupted = True
                shutil.rmtree((out / prompts[i].folder).with_name(prompts[i].folder + ".partial"), ignore_errors=True)
                rows[i] = summary_row(prompts[i], seeds[i], "cancelled", error=outcome.error or "interrupted")
            interrupted = interrupted or outcome.status == "cancelled"

    return finish_batch(out, rows, interrupted, started, prompt_file, cluster)


def finish_batch(out: Path, rows: Sequence[dict | None], interrupted: bool, started: float, prompt_file: str | Path,
                 cluster: ClusterOptions) -> BatchResult:
    """The summary files and the contact sheet of a batch that has run (or stopped)."""
    final = [r for r in rows if r is not None]
    result = BatchResult(final, interrupted, time.perf_counter() - started)
    meta = {"prompt_file": str(prompt_file), "out": str(out), "wall_seconds": result.seconds, "interrupted": interrupted,
            "cluster": dataclasses.asdict(cluster)}
    write_summary(out, final, meta)
    contact_sheet(out, final)
    return result


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
