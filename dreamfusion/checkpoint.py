"""Checkpoints: a run's scene (density and albedo grids, background, occupancy grid), its
configuration, prompt and step, and (for resuming training) the optimiser's state and the RNG,
in one safetensors file.

:func:`load_scene` rebuilds the scene alone, as a renderer, without loading any prior: exporting
or rendering a Stable Diffusion run's checkpoint works offline. :func:`read_checkpoint_info` reads
and checks a checkpoint's header alone (prompt, step, configuration) without importing torch, so
the command line refuses a bad file before anything is loaded or allocated.

A checkpoint is written byte for byte the same for the same state: safetensors orders the header's
metadata as its hash map happens to, so the header is written again with the metadata sorted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import MAX_STEPS, TrainConfig, config_from_dict, config_to_dict, validate_config, validate_prompt
from .files import atomic_write

if TYPE_CHECKING:
    import torch

    from .render import Renderer

#: version 2: density and albedo grids stored apart (version 1 had one 4-channel grid; still read)
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
CHECKPOINT_FILE = "checkpoint.safetensors"
#: a header larger than this is not ours (ours hold a few kB of JSON)
MAX_HEADER_BYTES = 16 * 2**20
META_KEYS = ("prompt", "step", "total_steps", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: corrupt, not ours, or from another version."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says: the run's prompt, step, total steps and configuration."""

    path: Path
    prompt: str
    step: int
    total_steps: int
    cfg: TrainConfig


# ----------------------------------------------------------------------------- the header


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (every tensor's data
    inside the file), without reading the tensors; a :class:`CheckpointError` otherwise."""
    unreadable = f"{path} is not a readable checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{unreadable} (its header is cut short); was it truncated or overwritten?")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{unreadable} (its header is not JSON); was it truncated or overwritten?") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{unreadable} (its header is not a JSON object)")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise CheckpointError(f"{unreadable} (tensor {name!r} lies beyond the end of the file); was it truncated or overwritten?")
    return header


def check_metadata(path: Path, meta: object) -> dict[str, str]:
    """A checkpoint's metadata, checked: our format, a version this code reads, every key present
    and well-formed. A :class:`CheckpointError` names what is wrong."""
    if not isinstance(meta, dict) or meta.get("format") != "dreamfusion":
        raise CheckpointError(f"{path} is a safetensors file but not a dreamfusion checkpoint")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} is a checkpoint of format version {meta.get('version')}; this dreamfusion reads versions "
                              f"{', '.join(READABLE_VERSIONS)}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path} is an incomplete checkpoint: its metadata lacks {', '.join(missing)}")
    try:
        step, total = int(meta["step"]), int(meta["total_steps"])
        if not 0 <= step <= MAX_STEPS or not 1 <= total <= MAX_STEPS:
            raise ValueError(f"step {step} of {total}")
        if not isinstance(json.loads(meta["config"]), dict):
            raise ValueError("config is not a JSON object")
        validate_prompt(meta["prompt"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has corrupt metadata ({exc})") from None
    return meta


def checkpoint_config(path: str | Path, meta: dict[str, str], overrides: dict | None = None) -> TrainConfig:
    """The run's configuration from a checkpoint's metadata, with ``overrides`` ({section: {key:
    value}} or {key: value}) applied: its types and values checked as the command line's own
    settings are (the device aside: that is the loader's choice), so a file that asks for a grid of
    8000^3 is refused before anything is allocated."""
    data = json.loads(meta["config"])
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(data.get(section, {}), dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    try:
        cfg = config_from_dict(data)
        validate_config(replace(cfg, device="cpu"))
    except ValueError as exc:
        raise CheckpointError(f"{path} holds settings this dreamfusion cannot run ({exc})") from None
    return cfg


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Prompt, step and configuration of a checkpoint, every one checked, from its header alone:
    no tensor is read and torch is not imported."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.exists() else f"{path} is not a checkpoint file")
    meta = check_metadata(path, safetensors_header(path).get("__metadata__"))
    return CheckpointInfo(path, meta["prompt"], int(meta["step"]), int(meta["total_steps"]), checkpoint_config(path, meta))


def checkpoint_in(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``: the file itself, or the checkpoint inside a run
    folder (a finished one, or the ``.partial`` folder of a stopped one)."""
    path = Path(path)
    if path.is_dir():
        inside = path / CHECKPOINT_FILE
        if inside.is_file():
            return inside
        stopped = path.with_name(path.name + ".partial") / CHECKPOINT_FILE
        hint = f"; the stopped run's checkpoint is {stopped}" if stopped.is_file() else ""
        raise CheckpointError(f"{path} is a folder without a checkpoint ({CHECKPOINT_FILE}){hint}")
    return path


# ----------------------------------------------------------------------------- tensors


def scene_tensors(renderer: Renderer) -> dict[str, torch.Tensor]:
    """The scene of a :class:`~dreamfusion.render.Renderer` as CPU tensors."""
    import torch

    tensors = {"field.density": renderer.field.density_grid.detach().cpu(), "field.albedo": renderer.field.albedo_grid.detach().cpu(),
               "field.blob_scale": renderer.field.blob_scale.detach().cpu().reshape(1),
               "field.sdf_beta": renderer.field.sdf_beta.detach().cpu().reshape(1)}
    for k, v in renderer.background.state_dict().items():
        tensors[f"background.{k}"] = v.cpu()
    tensors["occupancy.occs"] = renderer.estimator.occs.cpu()
    tensors["occupancy.binaries"] = renderer.estimator.binaries.cpu().to(torch.uint8)
    return tensors


def _check_grids(density: torch.Tensor, albedo: torch.Tensor) -> None:
    r = density.shape[-1] if density.dim() == 5 else 0
    if density.shape != (1, 1, r, r, r) or albedo.shape != (1, 3, r, r, r) or not 4 <= r <= 256:
        raise CheckpointError(f"checkpoint grids of shapes {tuple(density.shape)} and {tuple(albedo.shape)} are not a scene's "
                              "(1, 1, R, R, R) density and (1, 3, R, R, R) albedo with R of 4..256")


def load_scene_tensors(renderer: Renderer, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's scene into a renderer (whatever its grid resolution was)."""
    try:
        if "field.grid" in tensors:  # version 1
            density, albedo = tensors["field.grid"][:, :1], tensors["field.grid"][:, 1:4]
        else:
            density, albedo = tensors["field.density"], tensors["field.albedo"]
        _check_grids(density, albedo)
        renderer.field.load_grids(density, albedo)
        if "field.blob_scale" in tensors:
            renderer.field.blob_scale.fill_(float(tensors["field.blob_scale"].reshape(-1)[0]))
        # a checkpoint from before signed distance grids holds a density
        renderer.field.sdf_beta.fill_(float(tensors["field.sdf_beta"].reshape(-1)[0]) if "field.sdf_beta" in tensors else 0.0)
        renderer.background.load_state_dict({k[len("background."):]: v for k, v in tensors.items() if k.startswith("background.")})
        renderer.estimator.occs.copy_(tensors["occupancy.occs"])
        renderer.estimator.binaries.copy_(tensors["occupancy.binaries"].bool())
    except (KeyError, RuntimeError, IndexError, TypeError) as exc:
        raise CheckpointError(f"checkpoint does not match this configuration: {exc}") from None


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header's metadata in sorted order (the tensors' entries
    are sorted already), so the same tensors and metadata give the same bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())), **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensors' data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors and metadata as safetensors, atomically (a crash mid-write leaves the previous
    file intact) and canonically (:func:`canonical_safetensors`). A full disk or a read-only folder
    is the ``OSError`` of the write."""
    from safetensors.torch import save

    data = canonical_safetensors(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the previous checkpoint

    return atomic_write(Path(path), write)


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], prompt: str, step: int, total_steps: int, cfg: TrainConfig) -> Path:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    meta = {"format": "dreamfusion", "version": str(CHECKPOINT_VERSION), "prompt": prompt, "step": str(step),
            "total_steps": str(total_steps), "config": json.dumps(config_to_dict(cfg))}
    return write_safetensors(path, tensors, meta)


def read_checkpoint(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a checkpoint; a :class:`CheckpointError` naming what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.exists() else f"{path} is not a checkpoint file")
    meta = check_metadata(path, safetensors_header(path).get("__metadata__"))
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}); was it truncated or overwritten?") from None
    return meta, tensors


def build_scene(cfg: TrainConfig, device: torch.device | str = "cpu") -> Renderer:
    """An empty scene (field, background, renderer) for a configuration."""
    from .field import Background, GridField
    from .render import Renderer

    field = GridField(cfg.field)
    return Renderer(field, Background(cfg.field.background), cfg.render).to(device)


def load_scene(path: str | Path, device: torch.device | str = "cpu") -> tuple[Renderer, dict[str, str], TrainConfig]:
    """The scene of a checkpoint (or of a run folder's) as a :class:`~dreamfusion.render.Renderer`,
    plus its metadata and configuration. No prior is loaded."""
    path = checkpoint_in(path)
    meta, tensors = read_checkpoint(path)
    cfg = checkpoint_config(path, meta)
    renderer = build_scene(cfg, device)
    load_scene_tensors(renderer, {k: v.to(device) for k, v in tensors.items()})
    return renderer, meta, cfg
