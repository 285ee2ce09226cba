"""Training images for the embedded prior: renders of the procedural world, drawn from the same
camera, light and shading distribution that SDS training uses (``dreamfusion.cameras``,
``dreamfusion.shading``), with captions in the SPEC's form.

Rendering is sphere tracing of the exact SDFs, supersampled and box-filtered down to the prior's
resolution (antialiased, like the engine's renders downsampled before the prior sees them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cameras import CameraConfig, Cameras, Lights, camera_rays, sample_cameras, sample_lights
from ..shading import TRAINING_SHADING_MODES, shade
from .world import WorldObject, bounding_radius, build_object, caption, draw_example

BACKGROUND = 1.0  # white, as the engine's default background
SHADING_PROBS = (0.6, 0.2, 0.2)  # lit, textureless, albedo: shared with SDS training


def sample_shading_modes(n: int, rng: random.Random) -> list[str]:
    return rng.choices(TRAINING_SHADING_MODES, weights=SHADING_PROBS, k=n)


def _sdf_normals(obj: WorldObject, points: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    offsets = torch.eye(3, dtype=points.dtype) * eps
    grads = torch.stack([obj.sdf(points + o) - obj.sdf(points - o) for o in offsets], dim=-1)
    return grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-9)


def render_object(obj: WorldObject, cameras: Cameras, lights: Lights, modes: list[str], size: int,
                  supersample: int = 2, steps: int = 48) -> torch.Tensor:
    """Render ``obj`` from each camera. Returns (B, 3, size, size) in [0, 1] on a white background."""
    res = size * supersample
    origins, dirs = camera_rays(cameras, res, res)
    b = len(cameras)
    o = origins.reshape(-1, 3)
    d = dirs.reshape(-1, 3)
    # start at the bounding sphere of the world
    radius = bounding_radius() + 0.02
    od = (o * d).sum(-1)
    disc = od * od - ((o * o).sum(-1) - radius * radius)
    valid = disc > 0
    t = (-od - disc.clamp_min(0).sqrt()).clamp_min(0)
    t_far = -od + disc.clamp_min(0).sqrt()
    active = valid.clone()
    hit = torch.zeros_like(valid)
    for _ in range(steps):
        idx = active.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            break
        dist = obj.sdf(o[idx] + t[idx, None] * d[idx])
        t[idx] = t[idx] + dist * 0.95
        now_hit = dist < 1e-3
        hit[idx[now_hit]] = True
        gone = now_hit | (t[idx] > t_far[idx])
        active[idx[gone]] = False
    hit_idx = hit.nonzero(as_tuple=True)[0]
    colour = torch.full((o.shape[0], 3), BACKGROUND)
    if hit_idx.numel():
        pts = o[hit_idx] + t[hit_idx, None] * d[hit_idx]
        normals = _sdf_normals(obj, pts)
        _, albedo = obj.sdf_and_colour(pts)
        ray_cam = hit_idx // (res * res)
        mode_of = torch.tensor([TRAINING_SHADING_MODES.index(m) for m in modes])[ray_cam]
        out = torch.empty_like(albedo)
        for mi, mode in enumerate(TRAINING_SHADING_MODES):
            sel = mode_of == mi
            if sel.any():
                cam = ray_cam[sel]
                out[sel] = shade(mode, albedo[sel], normals[sel], pts[sel], lights.position[cam], lights.intensity[cam], lights.ambient[cam])
        colour[hit_idx] = out.clamp(0, 1)
    img = colour.reshape(b, res, res, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(img, supersample) if supersample > 1 else img


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) in [0, 1]
    captions: list[str]
    nouns: list[str]
    colours: list[str | None]
    modes: list[str]
    cameras: Cameras


def render_batch(n: int, size: int, rng: random.Random, generator: torch.Generator, camera_cfg: CameraConfig = CameraConfig(),
                 supersample: int = 2) -> Batch:
    """``n`` random training examples (objects grouped so that each SDF is evaluated once per group)."""
    draws = [draw_example(rng) for _ in range(n)]
    cams = sample_cameras(camera_cfg, n, generator)
    lights = sample_lights(camera_cfg, cams, generator)
    modes = sample_shading_modes(n, rng)
    images = torch.empty(n, 3, size, size)
    groups: dict[tuple, list[int]] = {}
    for i, dr in enumerate(draws):
        groups.setdefault((dr.noun, dr.colour), []).append(i)
    for (noun, colour), idx in groups.items():
        sel = torch.tensor(idx)
        sub_cams = Cameras(cams.c2w[sel], cams.focal[sel], cams.azimuth[sel], cams.elevation[sel], cams.distance[sel])
        sub_lights = Lights(lights.position[sel], lights.intensity[sel], lights.ambient[sel])
        images[sel] = render_object(build_object(noun, colour), sub_cams, sub_lights, [modes[i] for i in idx], size, supersample)
    captions = [caption(dr.phrase, float(cams.azimuth[i]), float(cams.elevation[i])) for i, dr in enumerate(draws)]
    return Batch(images, captions, [d.noun for d in draws], [d.colour for d in draws], modes, cams)
