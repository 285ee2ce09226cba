"""Checkpoints: a run's scene (density and albedo grids, background, occupancy grid), its
configuration, prompt and step, and (for resuming training) the optimiser's state and the RNG,
in one safetensors file.

:func:`load_scene` rebuilds the scene alone, as a renderer, without loading any prior: exporting
or rendering a Stable Diffusion run's checkpoint works offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import TrainConfig, config_from_dict, config_to_dict
from .files import atomic_write

if TYPE_CHECKING:
    from .render import Renderer

#: version 2: density and albedo grids stored apart (version 1 had one 4-channel grid; still read)
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = ("1", "2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: corrupt, not ours, or from another version."""


def scene_tensors(renderer: Renderer) -> dict[str, torch.Tensor]:
    """The scene of a :class:`~dreamfusion.render.Renderer` as CPU tensors."""
    tensors = {"field.density": renderer.field.density_grid.detach().cpu(), "field.albedo": renderer.field.albedo_grid.detach().cpu(),
               "field.blob_scale": renderer.field.blob_scale.detach().cpu().reshape(1)}
    for k, v in renderer.background.state_dict().items():
        tensors[f"background.{k}"] = v.cpu()
    tensors["occupancy.occs"] = renderer.estimator.occs.cpu()
    tensors["occupancy.binaries"] = renderer.estimator.binaries.cpu().to(torch.uint8)
    return tensors


def load_scene_tensors(renderer: Renderer, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's scene into a renderer (whatever its grid resolution was)."""
    try:
        if "field.grid" in tensors:  # version 1
            density, albedo = tensors["field.grid"][:, :1], tensors["field.grid"][:, 1:4]
        else:
            density, albedo = tensors["field.density"], tensors["field.albedo"]
        renderer.field.load_grids(density, albedo)
        if "field.blob_scale" in tensors:
            renderer.field.blob_scale.fill_(float(tensors["field.blob_scale"].reshape(-1)[0]))
        renderer.background.load_state_dict({k[len("background."):]: v for k, v in tensors.items() if k.startswith("background.")})
        renderer.estimator.occs.copy_(tensors["occupancy.occs"])
        renderer.estimator.binaries.copy_(tensors["occupancy.binaries"].bool())
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match this configuration: {exc}") from None


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], prompt: str, step: int, total_steps: int, cfg: TrainConfig) -> Path:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "dreamfusion", "version": str(CHECKPOINT_VERSION), "prompt": prompt, "step": str(step),
            "total_steps": str(total_steps), "config": json.dumps(config_to_dict(cfg))}
    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta))


def read_checkpoint(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a checkpoint; a :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}); was it truncated or overwritten?") from None
    if meta.get("format") != "dreamfusion":
        raise CheckpointError(f"{path} is a safetensors file but not a dreamfusion checkpoint")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} is a checkpoint of format version {meta.get('version')}; this dreamfusion reads versions "
                              f"{', '.join(READABLE_VERSIONS)}")
    missing = [k for k in ("prompt", "step", "total_steps", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} is an incomplete checkpoint: its metadata lacks {', '.join(missing)}")
    try:
        int(meta["step"]), int(meta["total_steps"])
        if not isinstance(json.loads(meta["config"]), dict):
            raise ValueError("config is not a JSON object")
    except ValueError as exc:
        raise CheckpointError(f"{path} has corrupt metadata ({exc})") from None
    return meta, tensors


def checkpoint_config(path: str | Path, meta: dict[str, str], overrides: dict | None = None) -> TrainConfig:
    """The run's configuration from a checkpoint's metadata, with ``overrides`` ({section: {key:
    value}} or {key: value}) applied."""
    data = json.loads(meta["config"])
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds a configuration this dreamfusion cannot read ({exc})") from None


def build_scene(cfg: TrainConfig, device: torch.device | str = "cpu") -> Renderer:
    """An empty scene (field, background, renderer) for a configuration."""
    from .field import Background, GridField
    from .render import Renderer

    field = GridField(cfg.field)
    return Renderer(field, Background(cfg.field.background), cfg.render).to(device)


def load_scene(path: str | Path, device: torch.device | str = "cpu") -> tuple[Renderer, dict[str, str], TrainConfig]:
    """The scene of a checkpoint as a :class:`~dreamfusion.render.Renderer`, plus its metadata
    and configuration. No prior is loaded."""
    meta, tensors = read_checkpoint(path)
    cfg = checkpoint_config(path, meta)
    renderer = build_scene(cfg, device)
    load_scene_tensors(renderer, {k: v.to(device) for k, v in tensors.items()})
    return renderer, meta, cfg
