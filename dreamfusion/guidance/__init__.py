"""Priors that grade renders, by name (the registry is :data:`dreamfusion.config.GUIDANCES`)."""

from __future__ import annotations

import copy
import importlib
import threading

import torch

from ..config import GUIDANCES, USER_GUIDANCES, GuidanceConfig, guidance_spec, resolve_guidance
from .base import Guidance, GuidanceError, RenderBatch

GUIDANCE_NAMES = tuple(GUIDANCES)

_SHARED: dict[tuple, Guidance] = {}
_SHARED_LOCK = threading.Lock()


def _model_key(cfg: GuidanceConfig, device: torch.device | str) -> tuple:
    """What makes two loaded priors different (per-run settings such as the guidance weight do not)."""
    return (cfg.name, cfg.model, str(device), bool(cfg.half_precision), bool(cfg.low_vram))


def load_guidance(cfg: GuidanceConfig, device: torch.device | str = "cpu", shared: bool = True) -> Guidance:
    """The prior named by ``cfg.name``, configured by ``cfg``; a :class:`GuidanceError` says what
    went wrong. ``shared``: the model is loaded once per process for each (name, model, device,
    precision, memory mode) and every caller gets a light copy that shares its weights (frozen, inference only)
    but carries its own settings."""
    try:
        spec = guidance_spec(cfg.name)
    except ValueError as exc:
        raise GuidanceError(str(exc)) from None
    cfg = resolve_guidance(cfg)
    key = _model_key(cfg, device)
    with _SHARED_LOCK:
        base = _SHARED.get(key) if shared else None
        if base is None:
            module, cls_name = spec.target.split(":")
            cls = getattr(importlib.import_module(module), cls_name)
            base = cls(cfg, device)
            if shared:
                _SHARED[key] = base
    out = copy.copy(base)
    out.cfg = cfg
    return out


def release_shared() -> None:
    """Forget the process's loaded priors (tests, or to free memory)."""
    with _SHARED_LOCK:
        _SHARED.clear()


def shared_priors() -> list[Guidance]:
    with _SHARED_LOCK:
        return list(_SHARED.values())


__all__ = ["GUIDANCE_NAMES", "USER_GUIDANCES", "Guidance", "GuidanceConfig", "GuidanceError", "RenderBatch", "load_guidance",
           "release_shared", "shared_priors"]
