"""Renders of a triangle mesh with the project's cameras and shading: what an exported mesh looks
like from a view, to set beside the field's volume render of the same view
(:func:`dreamfusion.metrics.render_match`).

A plain z-buffer on the CPU: each triangle is projected through the pinhole of
:func:`dreamfusion.cameras.camera_rays` and sampled at the pixel centres by
:func:`dreamfusion.export.rasterize_triangles` (a pixel on an edge shared by two triangles is
covered once); the nearest triangle wins each pixel. Vertex colours and normals are interpolated
perspective-correctly (barycentric weights divided by depth, then normalised); shading is
:func:`dreamfusion.shading.shade`, with the interpolated vertex normal.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from .cameras import Cameras, Lights
from .export import rasterize_triangles
from .shading import shade

#: triangles with a vertex nearer the camera than this (world units along its axis) are left out
NEAR = 1e-3


def project(points: np.ndarray, c2w: np.ndarray, focal: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) world points -> (N, 2) image coordinates (column, row: pixel ``(r, c)``'s centre is at
    ``(c, r)``, row 0 the top, as :func:`~dreamfusion.cameras.camera_rays` casts its rays) and (N,)
    depth along the camera's viewing axis (positive in front of it). ``c2w`` (3, 4) with columns
    right, up, back, position; ``focal`` a multiple of the image width."""
    points = np.asarray(points, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    local = (points - c2w[:, 3]) @ c2w[:, :3]  # components along right, up, back
    depth = -local[:, 2]
    f = focal * width
    safe = np.where(np.abs(depth) > 1e-12, depth, 1e-12)
    column = f * local[:, 0] / safe + width / 2.0 - 0.5
    row = -f * local[:, 1] / safe + height / 2.0 - 0.5
    return np.stack([column, row], axis=1), depth


def rasterize_view(vertices: np.ndarray, faces: np.ndarray, c2w: np.ndarray, focal: float, height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The nearest triangle at each pixel centre of one view. Returns ``pixel`` (K,) flat indices
    ``row * width + column`` of the covered pixels, ``face`` (K,) the triangle seen there,
    ``weights`` (K, 3) its perspective-correct barycentric weights (they sum to 1 and interpolate
    any vertex attribute as it varies over the 3D triangle) and ``depth`` (K,) along the viewing
    axis."""
    faces = np.asarray(faces, dtype=np.int64)
    image_points, depth = project(vertices, c2w, focal, height, width)
    kept = np.flatnonzero((depth[faces] > NEAR).all(axis=1))
    face, column, row, bary = rasterize_triangles(image_points, faces[kept], (width, height))
    face = kept[face]
    inverse = (bary / depth[faces[face]]).sum(axis=1)  # 1 / depth is linear in image space
    pixel = row * width + column
    order = np.lexsort((-inverse, pixel))  # by pixel, the nearest first
    first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]] if len(order) else order
    weights = bary[first] / depth[faces[face[first]]] / inverse[first, None]
    return pixel[first], face[first], weights, 1.0 / inverse[first]


def render_mesh(mesh: trimesh.Trimesh, cameras: Cameras, height: int, width: int, mode: str = "albedo", lights: Lights | None = None,
                background: float | torch.Tensor = 1.0) -> dict:
    """Render a mesh with vertex colours (``mesh.visual.vertex_colors``, uint8) as
    :meth:`dreamfusion.render.Renderer.render` renders the field, from the same cameras. ``mode``:
    albedo (the vertex colours as they are), lit or textureless (:func:`~dreamfusion.shading.shade`
    with ``lights``, which these need). ``background``: a grey level or (B, 3) colours behind it.

    Returns ``image`` (B, 3, H, W) in [0, 1], ``coverage`` (B, 1, H, W) bool (a triangle covers the
    pixel's centre) and ``depth`` (B, H, W) the distance along each pixel's ray to the surface (0
    where nothing is hit), on the cameras' device."""
    if mode not in ("albedo", "lit", "textureless"):
        raise ValueError(f"a mesh renders in albedo, lit or textureless mode, got {mode!r}")
    if mode != "albedo" and lights is None:
        raise ValueError(f"{mode} shading needs lights")
    device = cameras.c2w.device
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    colours = torch.from_numpy(np.array(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0)
    normals = torch.from_numpy(np.array(mesh.vertex_normals, dtype=np.float64)) if mode != "albedo" else None
    b = len(cameras)
    behind = torch.as_tensor(background, dtype=torch.float64).cpu().expand(b, 3)
    image = behind[:, :, None].expand(b, 3, height * width).clone()
    coverage = torch.zeros(b, height * width, dtype=torch.bool)
    distance = torch.zeros(b, height * width, dtype=torch.float64)
    c2w, focal = cameras.c2w.detach().double().cpu().numpy(), cameras.focal.detach().double().cpu().numpy()
    for v in range(b):
        pixel, face, weights, depth = rasterize_view(vertices, faces, c2w[v], float(focal[v]), height, width)
        corners = torch.from_numpy(faces[face])
        w = torch.from_numpy(weights)
        albedo = (w[..., None] * colours[corners]).sum(dim=1)
        # the ray through a pixel centre: its camera-space direction (x, y, -1), as camera_rays casts it
        f = focal[v] * width
        x = ((pixel % width) + 0.5 - width / 2.0) / f
        y = -((pixel // width) + 0.5 - height / 2.0) / f
        along = torch.from_numpy(depth * np.sqrt(x * x + y * y + 1.0))
        if mode == "albedo":
            colour = albedo
        else:
            direction = torch.from_numpy(np.stack([x, y, -np.ones_like(x)], axis=1) @ c2w[v][:, :3].T)
            direction = direction / direction.norm(dim=1, keepdim=True)
            points = torch.from_numpy(c2w[v][:, 3]) + along[:, None] * direction
            normal = (w[..., None] * normals[corners]).sum(dim=1)
            normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-12)
            light = lights[v]
            colour = shade(mode, albedo, normal, points, light.position.double().cpu(), light.intensity.double().cpu(),
                           light.ambient.double().cpu())
        index = torch.from_numpy(pixel)
        image[v][:, index] = colour.T
        coverage[v, index] = True
        distance[v, index] = along
    return {"image": image.reshape(b, 3, height, width).float().to(device),
            "coverage": coverage.reshape(b, 1, height, width).to(device),
            "depth": distance.reshape(b, height, width).float().to(device)}
