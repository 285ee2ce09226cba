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

from ..cameras import CameraConfig, Cameras, Lights, camera_rays, ray_box, sample_backgrounds, sample_cameras, sample_lights
from ..config import SHADING_PROBS
from ..shading import TRAINING_SHADING_MODES, shade
from .world import WorldObject, build_object, caption, draw_example

BACKGROUND = 1.0  # white, as the engine's default background (and of every render unless told otherwise)


def sample_shading_modes(n: int, rng: random.Random) -> list[str]:
    return rng.choices(TRAINING_SHADING_MODES, weights=SHADING_PROBS, k=n)


def _sdf_normals(obj: WorldObject, points: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    offsets = torch.eye(3, dtype=points.dtype) * eps
    grads = torch.stack([obj.sdf(points + o) - obj.sdf(points - o) for o in offsets], dim=-1)
    return grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-9)


def render_object(obj: WorldObject, cameras: Cameras, lights: Lights, modes: list[str], size: int,
                  supersample: int = 2, steps: int = 48, with_alpha: bool = False, part_colours: torch.Tensor | None = None,
                  backgrounds: torch.Tensor | None = None) -> torch.Tensor:
    """Render ``obj`` from each camera. Returns (B, 3, size, size) in [0, 1] on a white background
    (or per camera on ``backgrounds`` (B, 3)), or (B, 4, size, size) with ``with_alpha``: the
    coverage of each pixel (the fraction of its supersamples that hit the object) as a fourth
    channel. ``part_colours`` (B, P, 3): per camera, colours for the object's P parts in place of
    its own (one shape traced for many colours)."""
    res = size * supersample
    origins, dirs = camera_rays(cameras, res, res)
    b = len(cameras)
    o = origins.reshape(-1, 3)
    d = dirs.reshape(-1, 3)
    # trace only inside the object's own bounding box (a little enlarged)
    lo, hi = obj.bounds()
    t, t_far, active = ray_box(o, d, lo - 0.01, hi + 0.01)
    hit = torch.zeros_like(active)
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
    if backgrounds is None:
        colour = torch.full((o.shape[0], 3), BACKGROUND)
    else:
        colour = backgrounds.to(o.dtype)[:, None].expand(b, res * res, 3).reshape(-1, 3).clone()
    if hit_idx.numel():
        pts = o[hit_idx] + t[hit_idx, None] * d[hit_idx]
        normals = _sdf_normals(obj, pts)
        part = obj.nearest_part(pts)
        ray_cam = hit_idx // (res * res)
        table = part_colours if part_colours is not None else pts.new_tensor(obj.colours)[None].expand(b, -1, -1)
        albedo = table[ray_cam, part]
        mode_of = torch.tensor([TRAINING_SHADING_MODES.index(m) for m in modes])[ray_cam]
        out = torch.empty_like(albedo)
        for mi, mode in enumerate(TRAINING_SHADING_MODES):
            sel = mode_of == mi
            if sel.any():
                cam = ray_cam[sel]
                out[sel] = shade(mode, albedo[sel], normals[sel], pts[sel], lights.position[cam], lights.intensity[cam], lights.ambient[cam])
        colour[hit_idx] = out.clamp(0, 1)
    img = colour.reshape(b, res, res, 3).permute(0, 3, 1, 2)
    if with_alpha:
        img = torch.cat([img, hit.to(img.dtype).reshape(b, 1, res, res)], dim=1)
    return F.avg_pool2d(img, supersample) if supersample > 1 else img


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) in [0, 1], or (B, 4, S, S) with coverage last
    backgrounds: torch.Tensor  # (B, 3): each image's solid background colour
    captions: list[str]
    """each image's phrase and view label (SPEC form, :func:`~dreamfusion.prior.world.caption`)"""
    phrases: list[str]
    """the same captions without the view label"""
    nouns: list[str]
    colours: list[str | None]
    modes: list[str]
    cameras: Cameras
    lights: Lights


def render_batch(n: int, size: int, rng: random.Random, generator: torch.Generator, camera_cfg: CameraConfig | None = None,
                 supersample: int = 2, with_alpha: bool = False, synonyms: bool = False, random_background: float = 0.0,
                 cameras: Cameras | None = None, asymmetric_fraction: float = 0.0) -> Batch:
    """``n`` random training examples (objects grouped so that each SDF is evaluated once per group),
    drawn from ``camera_cfg`` (default: the current CameraConfig); a fraction ``random_background``
    of them on a random solid colour instead of white (:func:`~dreamfusion.cameras.sample_backgrounds`).
    ``cameras`` (n of them): render from these instead of drawing cameras. ``asymmetric_fraction``:
    see :func:`~dreamfusion.prior.world.draw_example`."""
    camera_cfg = camera_cfg or CameraConfig()
    draws = [draw_example(rng, synonyms, asymmetric_fraction) for _ in range(n)]
    cams = sample_cameras(camera_cfg, n, generator) if cameras is None else cameras
    lights = sample_lights(camera_cfg, cams, generator)
    modes = sample_shading_modes(n, rng)
    # drawn only when used, so a white-only recipe keeps its random stream (and its resumed runs) as before
    backgrounds = sample_backgrounds(n, random_background, generator) if random_background > 0 else torch.ones(n, 3)
    images = torch.empty(n, 4 if with_alpha else 3, size, size)
    groups: dict[str, list[int]] = {}
    for i, dr in enumerate(draws):
        groups.setdefault(dr.noun, []).append(i)
    for noun, idx in groups.items():  # a shape does not depend on its colour: one trace per noun
        sel = torch.tensor(idx)
        sub_cams, sub_lights = cams[sel], lights[sel]
        colours = torch.tensor([build_object(noun, draws[i].colour).colours for i in idx])
        images[sel] = render_object(build_object(noun, draws[idx[0]].colour), sub_cams, sub_lights, [modes[i] for i in idx], size,
                                    supersample, with_alpha=with_alpha, part_colours=colours, backgrounds=backgrounds[sel])
    captions = [caption(dr.phrase, float(cams.azimuth[i]), float(cams.elevation[i])) for i, dr in enumerate(draws)]
    return Batch(images, backgrounds, captions, [d.phrase for d in draws], [d.noun for d in draws], [d.colour for d in draws], modes, cams, lights)
