"""``DIR/batch.json``: the prompt list and the settings of a batch, hashed, so that a rerun knows
whether the folder holds this batch (resume) or another (refused unless ``--overwrite``); and the
state of the run folders in it."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write
from . import BatchError
from .prompts import BatchPrompt

MANIFEST = "batch.json"
#: the files of a finished ``dreamfusion generate`` folder that a batch checks for
RUN_FILES = ("config.json", "log.jsonl", "checkpoint.safetensors", "preview.png")


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


def sees_batch_folder(out: str | Path, run_id: str) -> bool:
    """Whether this process sees the batch folder the driver prepared (the same machine or a
    shared filesystem): its ``batch.json`` names this invocation."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text()).get("run_id") == run_id
    except (OSError, ValueError, AttributeError):
        return False

