"""Shading: DreamFusion's Lambertian model and the modes a render can take.

``c = albedo * (l_p * max(0, n . (l - x) / |l - x|) + l_a)``. Both the NeRF renderer and the
procedural world's renderer (the embedded prior's training data) call this one function.
"""

from __future__ import annotations

import torch

from .config import SHADING_MODES  # noqa: F401 - defined with the torch-free settings, used from here too

TRAINING_SHADING_MODES = ("lit", "textureless", "albedo")


def lambertian(albedo: torch.Tensor, normals: torch.Tensor, points: torch.Tensor, light_pos: torch.Tensor,
               light_intensity: torch.Tensor, ambient: torch.Tensor) -> torch.Tensor:
    """All tensors broadcast over leading dims; ``albedo``, ``normals``, ``points``, ``light_pos``
    are (..., 3), ``light_intensity`` and ``ambient`` are (...). Returns (..., 3)."""
    to_light = light_pos - points
    to_light = to_light / to_light.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    diffuse = (normals * to_light).sum(-1).clamp_min(0.0)
    return albedo * (light_intensity * diffuse + ambient)[..., None]


def shade(mode: str, albedo: torch.Tensor, normals: torch.Tensor, points: torch.Tensor, light_pos: torch.Tensor,
          light_intensity: torch.Tensor, ambient: torch.Tensor) -> torch.Tensor:
    """Colour of surface samples under a shading mode (``lit``, ``textureless`` or ``albedo``).

    ``textureless`` is ``lit`` with the albedo replaced by white: the paper's trick that makes the
    optimiser build geometry instead of painting it."""
    if mode == "lit":
        return lambertian(albedo, normals, points, light_pos, light_intensity, ambient)
    if mode == "textureless":
        return lambertian(torch.ones_like(albedo), normals, points, light_pos, light_intensity, ambient)
    if mode == "albedo":
        return albedo
    raise ValueError(f"unknown shading mode {mode!r}; expected one of {TRAINING_SHADING_MODES}")


def normals_to_rgb(normals: torch.Tensor) -> torch.Tensor:
    """Map unit normals in [-1, 1] to colours in [0, 1]."""
    return normals * 0.5 + 0.5
