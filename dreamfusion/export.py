"""Mesh extraction and export: marching cubes on a density field, vertex colours from an albedo
field, GLB/OBJ/PLY files, a UV-textured OBJ and GLB and turntable videos; and the steps that make a cleaner
asset, each off unless asked for: vertices moved onto the level set (:func:`refine_vertices`),
quadric decimation to a face budget (:func:`decimate_mesh`), edge-aware smoothing of the vertex
colours (:func:`smooth_colours`).

The functions take plain callables (``density_fn``, ``albedo_fn``, ``render_fn``) so they do not
depend on the NeRF code. Meshes are in world coordinates, +Z up, front +X (``shared/world/SPEC.md``);
only the GLB file is rotated to glTF's +Y up.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import trimesh

from .cameras import Cameras, orbit_cameras
from .files import atomic_write

#: a ray segment of this length (world units) through the surface density reaches opacity 0.5.
#: 0.15 (a sixth of an object's width) puts the surface where the 64 px training renders show the
#: silhouette: with 0.05 the meshes of SDS-trained scenes came out visibly smaller than their renders.
SURFACE_SEGMENT = 0.15
#: default surface density: 1 - exp(-sigma * SURFACE_SEGMENT) = 0.5
SURFACE_DENSITY = math.log(2.0) / SURFACE_SEGMENT
#: connected components with fewer than this fraction of the faces are dropped as floaters
MIN_COMPONENT_FRACTION = 0.01
#: reach (world units) of the opening that ``fill_voids="axes"`` applies to the axis-enclosed voids:
#: it fills them only where they are about twice this thick, whatever the marching-cubes grid. Two
#: voxels of the grid instead left the concave corners of a torus's hole (between the ring's bulge
#: and the hole's waist: enclosed from below or above and from the four sides) filled at 160^3, and
#: partly at 128^3 on trained scenes
FILL_OPENING = 0.03
MESH_SUFFIXES = (".glb", ".obj", ".ply")
VIDEO_SUFFIXES = (".mp4", ".gif")
#: H.264 works on 16 x 16 macro blocks: MP4 frames are padded to a multiple of this
MACRO_BLOCK = 16
_CHUNK = 1 << 18

# +Z up -> +Y up: a rotation of -90 degrees about X, (x, y, z) -> (x, z, -y)
_Z_UP_TO_Y_UP = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])


# ----------------------------------------------------------------------------- extraction


class ExportWarning(UserWarning):
    """Something the user should hear about an export (shown as a note by the CLI and the app);
    other libraries' warnings are not."""


def _evaluate(fn: Callable[[torch.Tensor], torch.Tensor], points: np.ndarray, device: torch.device | str) -> np.ndarray:
    """Apply ``fn`` to (N, 3) points in chunks, without gradients; returns a float32 numpy array
    with the first dimension N."""
    out = []
    with torch.no_grad():
        for start in range(0, len(points), _CHUNK):
            chunk = torch.as_tensor(points[start:start + _CHUNK], dtype=torch.float32, device=device)
            out.append(fn(chunk).float().cpu().numpy())
    return np.concatenate(out)


def _density_grid(density_fn: Callable[[torch.Tensor], torch.Tensor], resolution: int, bound: float, device: torch.device | str) -> np.ndarray:
    """(R, R, R) float32 density at the nodes of a regular grid over [-bound, bound]^3, indexed
    [x, y, z]. Evaluated slab by slab along X so that the point grid is never built whole."""
    axis = torch.linspace(-bound, bound, resolution, device=device)
    slabs = max(1, _CHUNK // (resolution * resolution))
    grid = np.empty((resolution, resolution, resolution), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, resolution, slabs):
            xs = axis[start:start + slabs]
            pts = torch.stack(torch.meshgrid(xs, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
            grid[start:start + len(xs)] = density_fn(pts).float().reshape(len(xs), resolution, resolution).cpu().numpy()
    return np.nan_to_num(grid, nan=0.0, posinf=np.finfo(np.float32).max)


def auto_threshold(grid: np.ndarray) -> float:
    """The surface density level for a density grid: :data:`SURFACE_DENSITY` (opacity 0.5 over a
    :data:`SURFACE_SEGMENT`-long segment), or half the grid's maximum (with a warning) when the
    density never reaches it. Raises ``ValueError`` when the grid holds no density at all."""
    peak = float(grid.max())
    if peak <= 0.0:
        raise ValueError("density is empty: nothing to export")
    if peak < SURFACE_DENSITY:
        warnings.warn(f"density peaks at {peak:.3g}, below the surface level {SURFACE_DENSITY:.3g}: "
                      f"extracting at half the peak, the mesh outlines a faint, possibly unfinished object", ExportWarning, stacklevel=3)
        return 0.5 * peak
    return SURFACE_DENSITY


def silhouette_level(opacity: torch.Tensor, max_density: torch.Tensor, levels: int = 64) -> float:
    """The density level whose surface has the silhouettes the renders show: of ``levels``
    candidates spaced evenly in log density over the range the views meet, the one whose
    silhouettes ({pixels whose ray meets density > L}) best match the renders' opacity > 0.5
    (highest IoU over all views; the middle of a tie). ``opacity``, ``max_density``: (V, H, W) from
    :meth:`dreamfusion.render.Renderer.opacity_and_max_density`. ``ValueError`` when no view shows
    anything solid."""
    solid = opacity > 0.5
    if not bool(solid.any()):
        raise ValueError("no view of the scene shows an opaque pixel: nothing to export")
    lo = float(max_density[solid].min().clamp_min(1e-6))
    hi = float(max_density.max())
    candidates = torch.logspace(math.log10(lo) - 1, math.log10(max(hi, lo * 1.0001)), levels, dtype=torch.float64)
    peak = max_density.double()
    scores = torch.stack([((peak > c) & solid).sum().double() / ((peak > c) | solid).sum().clamp_min(1) for c in candidates])
    best = torch.nonzero(scores >= scores.max() - 1e-12).flatten()
    return float(candidates[best[len(best) // 2]])


FILL_VOIDS = ("none", "enclosed", "axes")


def axis_enclosed(solid: np.ndarray, min_axes: int = 5) -> np.ndarray:
    """(R, R, R) bool: voxels from which at least ``min_axes`` of the 6 axis directions (+-x, +-y,
    +-z) run into ``solid`` before leaving the grid. A shell open on one side (a mug whose bottom
    never formed) still encloses its inside this way; a torus's hole (open up and down) or the space
    under a chair's seat (open down and to the sides) does not."""
    votes = np.zeros(solid.shape, dtype=np.int8)
    for axis in range(3):
        for flip in (False, True):
            s = np.flip(solid, axis) if flip else solid
            hit = np.logical_or.accumulate(s, axis=axis)  # solid at or before this voxel along the axis
            votes += np.flip(hit, axis) if flip else hit
    return votes >= min_axes


def fill_enclosed(grid: np.ndarray, level: float, mode: str = "axes", opening: int = 2) -> np.ndarray:
    """A copy of a density grid whose voids are raised to twice ``level`` (solid):

    - ``enclosed``: regions below the level that no path of voxels connects to the grid's border
      (the inside of a closed shell; no view can see it, so renders are unchanged);
    - ``axes``: those, and voxels enclosed from at least 5 of the 6 axis directions
      (:func:`axis_enclosed`) where they form a thick region (a morphological opening of
      ``opening`` voxels drops the thin slivers the rule also finds along concave surfaces, such as
      the inner rim of a torus; :func:`extract_mesh` sizes it in world units, :data:`FILL_OPENING`).

    Photometric and SDS gradients only reach a scene's visible surface, so a scene grown from a
    small blob is a shell; without this its mesh would be one too."""
    from scipy.ndimage import binary_fill_holes, binary_opening

    if mode not in FILL_VOIDS:
        raise ValueError(f"unknown void filling {mode!r}; expected one of {', '.join(FILL_VOIDS)}")
    solid = grid > level
    if mode == "none":
        return grid
    filled = binary_fill_holes(solid)
    if mode == "axes":
        filled |= binary_opening(axis_enclosed(solid) & ~solid, iterations=opening)
    out = grid.copy()
    out[filled & ~solid] = 2.0 * level
    return out


def drop_small_components(mesh: trimesh.Trimesh, min_fraction: float = MIN_COMPONENT_FRACTION) -> trimesh.Trimesh:
    """Remove connected components (by shared edges) with fewer than ``min_fraction`` of the faces,
    in place; vertex colours follow. Returns the mesh."""
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    sizes = np.bincount(labels)
    keep = sizes[labels] >= min_fraction * len(mesh.faces)
    if not keep.all():
        mesh.update_faces(keep)
        mesh.remove_unreferenced_vertices()
    return mesh


def composite_along_normals(density_fn: Callable[[torch.Tensor], torch.Tensor], albedo_fn: Callable[[torch.Tensor], torch.Tensor],
                            points: np.ndarray, normals: np.ndarray, depth: float, samples: int = 16,
                            device: torch.device | str = "cpu") -> np.ndarray:
    """The albedo a ray sees arriving at each point against its (outward) normal: ``samples``
    evenly spaced from ``depth`` outside to ``depth`` inside, alpha-composited front to back as the
    renderer does (alpha = 1 - exp(-density x step)), normalised by the ray's total weight. Where
    the ray meets no density (weight < 1e-3) the albedo at the point itself. Returns (N, 3)."""
    if depth <= 0 or samples < 2:
        raise ValueError(f"need depth > 0 and samples >= 2, got {depth} and {samples}")
    offsets = np.linspace(depth, -depth, samples, dtype=np.float32)
    step = 2.0 * depth / (samples - 1)
    out = np.empty((len(points), 3), dtype=np.float32)
    per_chunk = max(1, _CHUNK // samples)
    with torch.no_grad():
        ts = torch.as_tensor(offsets, device=device)
        for start in range(0, len(points), per_chunk):
            p = torch.tensor(points[start:start + per_chunk], dtype=torch.float32, device=device)  # a copy: trimesh's arrays are read-only
            n = torch.tensor(normals[start:start + per_chunk], dtype=torch.float32, device=device)
            xs = (p[:, None, :] + ts[None, :, None] * n[:, None, :]).reshape(-1, 3)
            sigma = density_fn(xs).float().reshape(len(p), samples)
            albedo = albedo_fn(xs).float().reshape(len(p), samples, 3)
            alpha = 1.0 - torch.exp(-sigma * step)
            trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1), dim=1)
            weights = alpha * trans
            total = weights.sum(dim=1, keepdim=True)
            colour = (weights[..., None] * albedo).sum(dim=1) / total.clamp_min(1e-6)
            centre = albedo_fn(p).float()
            out[start:start + len(p)] = torch.where(total > 1e-3, colour, centre).cpu().numpy()
    return out


def density_gradient(density_fn: Callable[[torch.Tensor], torch.Tensor], points: np.ndarray, eps: float,
                     device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) points -> the density there (N,) and its central-difference gradient (N, 3), step
    ``eps`` along each axis, as float64."""
    points = np.asarray(points, dtype=np.float64)
    offsets = np.concatenate([np.zeros((1, 3)), np.eye(3) * eps, -np.eye(3) * eps])  # (7, 3)
    values = _evaluate(density_fn, (points[:, None, :] + offsets[None]).reshape(-1, 3), device).astype(np.float64).reshape(len(points), 7)
    return values[:, 0], (values[:, 1:4] - values[:, 4:7]) / (2.0 * eps)


def refine_vertices(vertices: np.ndarray, density_fn: Callable[[torch.Tensor], torch.Tensor], level: float, max_move: float,
                    steps: int = 3, eps: float | None = None, device: torch.device | str = "cpu") -> np.ndarray:
    """Move vertices onto the level set ``density = level`` along the density's gradient: ``steps``
    Newton steps ``x <- x - (density(x) - level) g / |g|^2`` (``g`` the central-difference gradient,
    :func:`density_gradient`, step ``eps``, default ``max_move / 4``).

    Marching cubes places a vertex by linear interpolation along one grid edge, so it sits up to a
    fraction of a voxel off the field's level set, which dents flat faces and rounds edges. Each
    vertex moves at most ``max_move`` (half a voxel: the level set it belongs to is that close;
    further away lies another part of the surface); where the gradient vanishes it stays.
    ``vertices`` (N, 3) -> (N, 3) float64."""
    if steps < 0 or max_move <= 0:
        raise ValueError(f"need steps >= 0 and max_move > 0, got {steps} and {max_move}")
    start = np.asarray(vertices, dtype=np.float64)
    eps = max_move / 4.0 if eps is None else eps
    points = start.copy()
    for _ in range(steps):
        value, grad = density_gradient(density_fn, points, eps, device)
        norm2 = (grad * grad).sum(axis=1)
        flat = norm2 < 1e-12
        step = np.where(flat, 0.0, (value - level) / np.where(flat, 1.0, norm2))
        points = points - step[:, None] * grad
        move = points - start
        length = np.linalg.norm(move, axis=1)
        too_far = length > max_move
        points[too_far] = start[too_far] + move[too_far] * (max_move / length[too_far])[:, None]
    return points


def smooth_surface(mesh: trimesh.Trimesh, iterations: int, lamb: float = 0.5, nu: float = 0.53) -> np.ndarray:
    """Taubin's lambda|mu smoothing of a mesh's surface (trimesh's ``filter_taubin``): ``iterations``
    pairs of a shrinking Laplacian step (``lamb``) and an inflating one (``nu``), a low-pass filter
    that evens out ripples of a few faces without the shrinking plain Laplacian smoothing causes.
    Returns the new (V, 3) vertices; the mesh and its faces are left as they were."""
    if iterations < 0:
        raise ValueError(f"need iterations >= 0, got {iterations}")
    smooth = trimesh.Trimesh(np.asarray(mesh.vertices, dtype=np.float64).copy(), np.asarray(mesh.faces), process=False)
    if iterations > 0:
        trimesh.smoothing.filter_taubin(smooth, lamb=lamb, nu=nu, iterations=iterations)
    return np.asarray(smooth.vertices, dtype=np.float64)


def distance_to_mesh(points: np.ndarray, mesh: trimesh.Trimesh, candidates: int = 16) -> np.ndarray:
    """(N, 3) points -> (N,) their distance to the mesh's surface: the nearest point of the faces
    with the ``candidates`` nearest centroids and of the faces around the nearest vertex (exact
    unless a far larger face than those is nearer; never an underestimate)."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    triangles = np.asarray(mesh.triangles, dtype=np.float64)
    k = min(candidates, len(triangles))
    _, near_faces = cKDTree(triangles.mean(axis=1)).query(points, k=k)
    near_faces = near_faces.reshape(len(points), k)
    _, near_vertex = cKDTree(np.asarray(mesh.vertices)).query(points)
    around = np.asarray(mesh.vertex_faces)[near_vertex]  # padded with -1
    around = np.where(around < 0, near_faces[:, :1], around)
    faces = np.concatenate([near_faces, around], axis=1)
    closest = trimesh.triangles.closest_point(triangles[faces.ravel()], np.repeat(points, faces.shape[1], axis=0))
    distance = np.linalg.norm(closest - np.repeat(points, faces.shape[1], axis=0), axis=1)
    return distance.reshape(len(points), -1).min(axis=1)


def decimate_mesh(mesh: trimesh.Trimesh, max_faces: int) -> tuple[trimesh.Trimesh, dict]:
    """Quadric edge-collapse decimation (trimesh's ``simplify_quadric_decimation``, the
    fast-simplification library) to at most ``max_faces`` faces, and what it cost: returns the new
    mesh (no colours: sample them again on it) and ``faces_before``, ``faces``, ``mean_distance``
    and ``max_distance`` (world units) from the old mesh's vertices to the new surface
    (:func:`distance_to_mesh`). A mesh already within the budget comes back as it is, at no cost."""
    if max_faces < 4:
        raise ValueError(f"a face budget below 4 makes no closed surface, got {max_faces}")
    before = len(mesh.faces)
    if before <= max_faces:
        return mesh, {"faces_before": before, "faces": before, "mean_distance": 0.0, "max_distance": 0.0}
    target = max_faces
    for _ in range(8):  # the library may end a few faces over its target: ask for fewer until within the budget
        simple = mesh.simplify_quadric_decimation(face_count=target)
        if len(simple.faces) <= max_faces:
            break
        target = max(4, target - (len(simple.faces) - max_faces) - max(1, target // 100))
    else:
        raise RuntimeError(f"decimation stopped at {len(simple.faces)} faces, over the budget of {max_faces}")
    out = trimesh.Trimesh(np.asarray(simple.vertices), np.asarray(simple.faces), process=False)
    distance = distance_to_mesh(np.asarray(mesh.vertices), out)
    return out, {"faces_before": before, "faces": len(out.faces), "mean_distance": float(distance.mean()),
                 "max_distance": float(distance.max())}


def smooth_colours(colours: np.ndarray, edges: np.ndarray, iterations: int, max_difference: float) -> np.ndarray:
    """Edge-aware smoothing of vertex colours on a mesh: ``iterations`` times, each colour becomes
    the mean of itself and those neighbours (vertices sharing an edge) whose colour differs from it
    by at most ``max_difference`` in every channel. Speckle within a flat colour evens out; across a
    sharp change of colour (a step larger than ``max_difference``) nothing is averaged, so the
    boundary stays sharp. ``colours`` (V, C), ``edges`` (E, 2) vertex indices -> (V, C) float64."""
    if iterations < 0 or max_difference < 0:
        raise ValueError(f"need iterations >= 0 and max_difference >= 0, got {iterations} and {max_difference}")
    colours = np.asarray(colours, dtype=np.float64).copy()
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    a, b = np.concatenate([edges[:, 0], edges[:, 1]]), np.concatenate([edges[:, 1], edges[:, 0]])  # both directions
    for _ in range(iterations):
        near = np.abs(colours[a] - colours[b]).max(axis=1) <= max_difference
        src, dst = a[near], colours[b[near]]
        total = colours + np.stack([np.bincount(src, dst[:, c], minlength=len(colours)) for c in range(colours.shape[1])], axis=1)
        count = 1.0 + np.bincount(src, minlength=len(colours))
        colours = total / count[:, None]
    return colours


def extract_mesh(density_fn: Callable[[torch.Tensor], torch.Tensor], albedo_fn: Callable[[torch.Tensor], torch.Tensor],
                 resolution: int = 128, bound: float = 1.0, threshold: float | None = None, device: torch.device | str = "cpu",
                 fill_voids: str = "axes", colour_depth: float = 0.0, refine_steps: int = 0, surface_smoothing: int = 0,
                 max_faces: int = 0, colour_smoothing: int = 0, colour_edge: float = 0.1) -> trimesh.Trimesh:
    """Marching-cubes mesh of a density field, with vertex colours.

    ``density_fn``: (N, 3) float32 points -> (N,) density >= 0, sampled on a ``resolution``^3 grid
    over [-bound, bound]^3 (outside it the density counts as 0, so the mesh is closed at the grid's
    faces). ``albedo_fn``: (N, 3) points -> (N, 3) RGB in [0, 1], sampled at the vertices and stored
    as uint8 RGBA (value x 255, rounded). ``threshold``: the surface's density level; None picks it
    with :func:`auto_threshold`. ``fill_voids``: which voids become solid (:func:`fill_enclosed`,
    its opening :data:`FILL_OPENING` wide whatever the resolution).
    ``colour_depth``: vertex colours composite the albedo along the normal from this far (world
    units) outside the surface to as far inside, as a ray through the surface sees it
    (:func:`composite_along_normals`); 0: the albedo at the vertex.
    Components with < 1% of the faces (floaters) are dropped. Then, each only when asked for:
    ``refine_steps`` Newton steps move the vertices onto the level set (:func:`refine_vertices`, at
    most half a voxel); ``surface_smoothing`` iterations of Taubin smoothing
    (:func:`smooth_surface`); ``max_faces`` > 0 decimates to that face budget (:func:`decimate_mesh`; what
    it cost is in ``mesh.metadata["decimation"]``; the scraps it pinches off are dropped as floaters);
    ``colour_smoothing`` iterations of edge-aware
    colour smoothing (:func:`smooth_colours`, across steps of at most ``colour_edge``).

    Returns a mesh in world coordinates (+Z up) whose faces wind counter-clockwise seen from
    outside, i.e. face normals point towards lower density.
    """
    from skimage.measure import marching_cubes

    if resolution < 2 or bound <= 0:
        raise ValueError(f"need resolution >= 2 and bound > 0, got {resolution} and {bound}")
    grid = _density_grid(density_fn, resolution, bound, device)
    level = auto_threshold(grid) if threshold is None else float(threshold)
    if level <= 0:
        raise ValueError(f"the surface's density level must be positive, got {level:.3g}")
    if grid.max() <= level:
        raise ValueError(f"density is empty at level {level:.3g} (its maximum is {grid.max():.3g}): nothing to export")
    voxel = 2.0 * bound / (resolution - 1)
    grid = fill_enclosed(grid, level, fill_voids, opening=max(2, math.ceil(FILL_OPENING / voxel - 1e-9)))
    padded = np.pad(grid, 1, constant_values=0.0)
    # 'ascent': the object is where the values are high, so the winding makes normals point outward
    verts, faces, _, _ = marching_cubes(padded, level, gradient_direction="ascent")
    verts = (verts - 1.0) * voxel - bound
    mesh = trimesh.Trimesh(verts, faces, process=False)
    drop_small_components(mesh)
    if refine_steps > 0:
        mesh.vertices = refine_vertices(mesh.vertices, density_fn, level, max_move=0.5 * voxel, steps=refine_steps, device=device)
    if surface_smoothing > 0:
        mesh.vertices = smooth_surface(mesh, surface_smoothing)
    decimation = None
    if max_faces > 0:
        mesh, decimation = decimate_mesh(mesh, max_faces)
        # edge collapses can pinch off scraps (two faces back to back, on real scenes' thin places): not
        # part of the asset's surface, and they leave the file not watertight
        drop_small_components(mesh)
        decimation["faces"] = len(mesh.faces)
    if colour_depth > 0:  # the albedo the renders show; at the level itself it is half fog, half surface
        rgb = composite_along_normals(density_fn, albedo_fn, np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals),
                                      colour_depth, device=device)
    else:
        rgb = _evaluate(albedo_fn, np.asarray(mesh.vertices), device)
    rgb = np.clip(rgb, 0.0, 1.0)
    if colour_smoothing > 0:
        rgb = smooth_colours(rgb, mesh.edges_unique, colour_smoothing, colour_edge)
    rgba = np.concatenate([np.round(rgb * 255), np.full((len(rgb), 1), 255.0)], axis=1).astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    if decimation is not None:
        mesh.metadata["decimation"] = decimation
    return mesh


# ----------------------------------------------------------------------------- files


def to_y_up(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy rotated from +Z up to glTF's +Y up: (x, y, z) -> (x, z, -y); the front (+X) stays +X."""
    out = mesh.copy()
    out.apply_transform(_Z_UP_TO_Y_UP)
    return out


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image (3, H, W) tensor or (H, W, 3) array in [0, 1] -> (H, W, 3) uint8 (value x 255,
    rounded, clipped): the one conversion for every PNG, frame and sheet."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = image.permute(1, 2, 0) if image.dim() == 3 and image.shape[0] in (1, 3, 4) else image
        image = image.numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] to linear light (the IEC 61966-2-1 curve)."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] to sRGB-encoded values (the inverse of :func:`srgb_to_linear`)."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(np.clip(c, 0.0031308, None), 1 / 2.4) - 0.055)


#: the vertex-coloured GLB's material: matte and not metal (glTF's default material, used when a
#: primitive names none, is fully metallic, which viewers show dark and tinted by their environment)
MATTE_MATERIAL = {"name": "albedo", "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0,
                                                             "roughnessFactor": 1.0}}


def _matte_material(tree: dict) -> None:
    """Every primitive of a glTF tree given :data:`MATTE_MATERIAL`."""
    tree["materials"] = [dict(MATTE_MATERIAL)]
    for mesh in tree.get("meshes", []):
        for primitive in mesh["primitives"]:
            primitive["material"] = 0


def glb_bytes(mesh: trimesh.Trimesh) -> bytes:
    """``mesh`` as a GLB, rotated to glTF's +Y up: its vertex colours as COLOR_0 in linear light, as
    glTF defines that attribute (the albedo is sRGB-encoded, as the renders show it: a viewer that
    lights the mesh and encodes its output in sRGB then shows the albedo's own colours), and a
    matte, non-metallic material (:data:`MATTE_MATERIAL`)."""
    out = to_y_up(mesh)
    colours = np.asarray(out.visual.vertex_colors)
    linear = np.round(srgb_to_linear(colours[:, :3] / 255.0) * 255.0).astype(np.uint8)
    out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=np.concatenate([linear, colours[:, 3:]], axis=1))
    return trimesh.exchange.gltf.export_glb(trimesh.Scene(out), tree_postprocessor=_matte_material)


def save_mesh(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Write ``mesh`` with its vertex colours, the format chosen by the suffix: ``.glb``
    (:func:`glb_bytes`: +Y up, linear COLOR_0, a matte material), ``.obj`` and ``.ply`` (+Z up, the
    colours as they are). Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise ValueError(f"unknown mesh format {path.suffix!r} for {path.name!r}; valid suffixes: {', '.join(MESH_SUFFIXES)}")
    if suffix == ".glb":
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(glb_bytes(mesh)))
    return atomic_write(path, lambda tmp: mesh.export(tmp, file_type=suffix[1:]))


def rasterize_triangles(vertices: np.ndarray, faces: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which integer lattice points (i, j), 0 <= i < shape[0], 0 <= j < shape[1], each 2D triangle
    covers, with barycentric coordinates.

    ``vertices`` (V, 2) in lattice units, ``faces`` (F, 3) indices. Points on an edge shared by two
    triangles count once (a top-left style rule on canonically evaluated edge functions), so ray
    parity and texture baking see no cracks and no double hits. Returns ``face`` (K,), ``i`` (K,),
    ``j`` (K,) and ``bary`` (K, 3) float64.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    tri = vertices[faces]  # (F, 3, 2)
    lo = np.clip(np.ceil(tri.min(axis=1)), 0, None).astype(np.int64)
    hi = np.minimum(np.floor(tri.max(axis=1)), np.array(shape) - 1).astype(np.int64)
    width, height = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    counts = np.where((width > 0) & (height > 0), width * height, 0)
    face = np.repeat(np.arange(len(faces)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    i = lo[face, 0] + local % width[face]
    j = lo[face, 1] + local // width[face]
    p = np.stack([i, j], axis=1).astype(np.float64)

    edges = np.empty((len(face), 3))
    inside = np.ones(len(face), dtype=bool)
    ab, ac = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = ab[:, 0] * ac[:, 1] - ab[:, 1] * ac[:, 0]
    ccw = np.sign(area)[face]
    for k in range(3):
        a, b = faces[face, k], faces[face, (k + 1) % 3]
        first, second = np.minimum(a, b), np.maximum(a, b)
        p0, p1 = vertices[first], vertices[second]
        # the same arithmetic for both triangles sharing the edge: identical values, opposite signs
        canonical = (p1[:, 0] - p0[:, 0]) * (p[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p[:, 0] - p0[:, 0])
        e = np.where(a == first, canonical, -canonical) * ccw
        direction = (vertices[b] - vertices[a]) * ccw[:, None]  # the edge as walked counter-clockwise
        owner = (direction[:, 1] > 0) | ((direction[:, 1] == 0) & (direction[:, 0] > 0))
        inside &= (e > 0) | ((e == 0) & owner)
        edges[:, k] = e
    inside &= ccw != 0
    face, i, j, edges = face[inside], i[inside], j[inside], edges[inside]
    # barycentric weight of vertex k is the edge function of the opposite edge (k+1 -> k+2)
    bary = np.roll(edges, -1, axis=1)
    bary /= bary.sum(axis=1, keepdims=True)
    return face, i, j, bary


def _dilate(image: np.ndarray, filled: np.ndarray, steps: int = 8) -> np.ndarray:
    """Grow the filled texels of an (H, W, C) image into the empty ones (mean of filled 4-neighbours),
    ``steps`` times, so bilinear lookups at chart borders do not pick up the background; what stays
    empty gets the mean colour."""
    image, filled = image.copy(), filled.copy()
    for _ in range(steps):
        total = np.zeros_like(image)
        count = np.zeros(filled.shape)
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            total += np.roll(image * filled[..., None], shift, axis=axis)
            count += np.roll(filled, shift, axis=axis)
        grow = ~filled & (count > 0)
        image[grow] = total[grow] / count[grow, None]
        filled |= grow
    image[~filled] = image[filled].mean(axis=0) if filled.any() else 0.0
    return image


def bake_vertex_colours(mesh: trimesh.Trimesh, texture_size: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A UV atlas of the mesh (xatlas) with its vertex colours baked into a texture.

    Returns ``vertices`` (V', 3) (a vertex is split where a chart's border cuts it), ``faces`` (F, 3),
    ``uvs`` (V', 2) in [0, 1] (v up, as OBJ and glTF's loaders in trimesh read it) and ``image``
    (texture_size, texture_size, 3) uint8: each texel the barycentric blend of its face's vertex
    colours, the empty texels filled from their neighbours (:func:`_dilate`) so lookups at chart
    borders do not pick up the background."""
    import xatlas

    vmapping, indices, uvs = xatlas.parametrize(np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.uint32))
    colours = np.asarray(mesh.visual.vertex_colors)[vmapping, :3].astype(np.float64)
    # texel (row r, column c) has its centre at u = (c + 0.5) / size, v = 1 - (r + 0.5) / size
    lattice = np.stack([uvs[:, 0] * texture_size - 0.5, (1.0 - uvs[:, 1]) * texture_size - 0.5], axis=1)
    face, col, row, bary = rasterize_triangles(lattice, indices, (texture_size, texture_size))
    image = np.zeros((texture_size, texture_size, 3))
    filled = np.zeros((texture_size, texture_size), dtype=bool)
    image[row, col] = np.einsum("kv,kvc->kc", bary, colours[indices[face].astype(np.int64)])
    filled[row, col] = True
    image = np.round(_dilate(image, filled)).clip(0, 255).astype(np.uint8)
    return np.asarray(mesh.vertices)[vmapping], indices.astype(np.int64), np.asarray(uvs, dtype=np.float64), image


def save_textured_obj(mesh: trimesh.Trimesh, path: str | Path, texture_size: int = 512) -> Path:
    """Write ``mesh`` as an OBJ with UVs from xatlas and its vertex colours baked into a texture:
    ``path`` (.obj), ``<stem>.mtl`` and ``<stem>.png`` beside it (+Z up). Returns the OBJ's path."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".obj":
        raise ValueError(f"a textured mesh is written as .obj, got {path.name!r}")
    vertices, faces, uvs, image = bake_vertex_colours(mesh, texture_size)
    # white diffuse and ambient, no specular: viewers multiply the texture by these
    material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(image), name=path.stem, diffuse=(255, 255, 255, 255),
                                                      ambient=(255, 255, 255, 255), specular=(0, 0, 0, 255))
    textured = trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(uv=uvs, material=material), process=False)
    text, files = trimesh.exchange.obj.export_obj(textured, include_color=False, include_texture=True, return_texture=True,
                                                  mtl_name=f"{path.stem}.mtl")
    for name, data in files.items():  # the material and its image first, the OBJ that names them last
        atomic_write(path.parent / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


#: glTF's extension for materials shown as their base colour, unlit: the albedo is the colour
UNLIT = "KHR_materials_unlit"


def _mark_unlit(tree: dict) -> None:
    """A glTF tree's materials made unlit (:data:`UNLIT`), the extension declared as used (not
    required: a viewer without it falls back to the material's matte, non-metallic PBR)."""
    for material in tree.get("materials", []):
        material.setdefault("extensions", {})[UNLIT] = {}
    if tree.get("materials"):
        tree["extensionsUsed"] = sorted(set(tree.get("extensionsUsed", [])) | {UNLIT})


def save_textured_glb(mesh: trimesh.Trimesh, path: str | Path, texture_size: int = 1024) -> Path:
    """Write ``mesh`` as a GLB with UVs (xatlas) and its vertex colours baked into a PNG texture
    inside the file (:func:`bake_vertex_colours`), rotated to glTF's +Y up. The material is the
    texture as base colour, unlit (``KHR_materials_unlit``), with a matte, non-metallic PBR
    fallback: viewers show the albedo as it is, as the vertex-coloured GLB does. Returns the path."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".glb":
        raise ValueError(f"a textured GLB is written as .glb, got {path.name!r}")
    vertices, faces, uvs, image = bake_vertex_colours(mesh, texture_size)
    material = trimesh.visual.material.PBRMaterial(name="albedo", baseColorTexture=Image.fromarray(image), baseColorFactor=[255, 255, 255, 255],
                                                   metallicFactor=0.0, roughnessFactor=1.0)
    textured = to_y_up(trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(uv=uvs, material=material), process=False))
    data = trimesh.exchange.gltf.export_glb(trimesh.Scene(textured), tree_postprocessor=_mark_unlit)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# ----------------------------------------------------------------------------- turntable


def _to_frames(images: torch.Tensor | np.ndarray, size: int) -> np.ndarray:
    """(B, 3, H, W) images in [0, 1] (tensor or array) -> (B, H, W, 3) uint8, checking H = W = size."""
    images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
        raise ValueError(f"render_fn must return (B, 3, {size}, {size}) images, got {tuple(images.shape)}")
    return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _pad_to_macro_block(frames: np.ndarray) -> np.ndarray:
    """Pad (T, H, W, 3) frames to multiples of :data:`MACRO_BLOCK` by repeating the edge pixels
    (the background), keeping the object centred."""
    pads = [(0, 0)]
    for n in frames.shape[1:3]:
        extra = -n % MACRO_BLOCK
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(frames, pads + [(0, 0)], mode="edge")


def save_turntable(render_fn: Callable[[Cameras], torch.Tensor], path: str | Path, frames: int = 36, size: int = 128,
                   fps: int = 12) -> Path:
    """Render ``frames`` views around the object (:func:`dreamfusion.cameras.orbit_cameras`, 8 at a
    time) and write them as ``.mp4`` (H.264; frames padded to multiples of 16 pixels) or ``.gif``.

    ``render_fn``: a Cameras batch of B -> (B, 3, size, size) images in [0, 1]. Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"unknown video format {path.suffix!r} for {path.name!r}; valid suffixes: {', '.join(VIDEO_SUFFIXES)}")
    if frames <= 0 or size <= 0 or fps <= 0:
        raise ValueError(f"frames, size and fps must be positive, got {frames}, {size}, {fps}")
    cams = orbit_cameras(frames)
    fields = (cams.c2w, cams.focal, cams.azimuth, cams.elevation, cams.distance)
    video = np.concatenate([_to_frames(render_fn(Cameras(*(t[s:s + 8] for t in fields))), size) for s in range(0, frames, 8)])

    if suffix == ".mp4":
        import imageio.v2 as imageio

        def write(tmp: str) -> None:
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=MACRO_BLOCK) as writer:
                for frame in _pad_to_macro_block(video):
                    writer.append_data(frame)
    else:
        import imageio.v3 as iio

        def write(tmp: str) -> None:
            iio.imwrite(tmp, video, extension=".gif", duration=1000.0 / fps, loop=0)
    return atomic_write(path, write)
