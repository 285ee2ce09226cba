"""Benchmark scores of an exported mesh against the world's true object (``shared/world/SPEC.md``,
"Benchmark prompts"): volumetric IoU on a 64^3 grid over [-0.75, 0.75]^3 after moving the mesh's
bounding-box centre to the origin, colour error at the nearest true surface point, and geometric
R-Precision (is the true object the best IoU match among all 16?) beside the free baseline of a
centred sphere; and the measures of a clean asset, on area-weighted samples of the centred mesh's
surface against the exact SDF (:func:`surface_measures`): distance to the true surface, the angle
between the mesh's normals and the true ones, and colour noise within one true part.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from .export import extract_mesh, rasterize_triangles
from .prior.world import WorldObject, all_objects

GRID_RESOLUTION = 64
GRID_BOUND = 0.75
#: radii of the centred-sphere baseline (world units)
SPHERE_RADII = np.round(np.arange(0.20, 0.60 + 1e-9, 0.01), 2)


def grid_centres(resolution: int = GRID_RESOLUTION, bound: float = GRID_BOUND) -> np.ndarray:
    """(R, R, R, 3) float64 centres of the voxels of a regular grid over [-bound, bound]^3, indexed [x, y, z]."""
    axis = -bound + (np.arange(resolution) + 0.5) * (2.0 * bound / resolution)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)


def voxelize_mesh(mesh: trimesh.Trimesh, resolution: int = GRID_RESOLUTION, bound: float = GRID_BOUND) -> np.ndarray:
    """(R, R, R) bool occupancy of the voxel centres over [-bound, bound]^3, indexed [x, y, z].

    Ray parity along each of the three axes (a centre is inside when an odd number of surface
    crossings lies below it), then a majority vote of the three: a hole in a not quite watertight
    mesh spoils only the rays through it, and the other two axes outvote those.
    """
    if len(mesh.faces) == 0:
        return np.zeros((resolution,) * 3, dtype=bool)
    voxel = 2.0 * bound / resolution
    index = (np.asarray(mesh.vertices, dtype=np.float64) + bound) / voxel - 0.5  # voxel centres at integers
    faces = np.asarray(mesh.faces, dtype=np.int64)
    votes = np.zeros((resolution,) * 3, dtype=np.int64)
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        face, i, j, bary = rasterize_triangles(index[:, [u, v]], faces, (resolution, resolution))
        depth = (bary * index[faces[face], axis]).sum(axis=1)
        first_above = np.clip(np.floor(depth) + 1, 0, resolution).astype(np.int64)
        crossings = np.bincount((i * resolution + j) * (resolution + 1) + first_above, minlength=resolution * resolution * (resolution + 1))
        parity = np.cumsum(crossings.reshape(resolution, resolution, resolution + 1)[..., :resolution], axis=-1) % 2
        votes += np.moveaxis(parity, 2, axis)
    return votes >= 2


_OCCUPANCY: dict[tuple[str, int, float], np.ndarray] = {}
_SPHERE_IOU: dict[tuple[str, int, float], float] = {}


def true_occupancy(obj: WorldObject, resolution: int = GRID_RESOLUTION, bound: float = GRID_BOUND) -> np.ndarray:
    """(R, R, R) bool: the voxel centres where the object's SDF is <= 0. Read-only and cached per
    noun (a world object's shape does not depend on its colour)."""
    key = (obj.noun, resolution, float(bound))
    if key not in _OCCUPANCY:
        points = torch.from_numpy(grid_centres(resolution, bound).reshape(-1, 3))
        with torch.no_grad():
            occ = (obj.sdf(points) <= 0).numpy().reshape((resolution,) * 3)
        occ.setflags(write=False)
        _OCCUPANCY[key] = occ
    return _OCCUPANCY[key]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool arrays of the same shape (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def centred(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of the mesh translated so that its bounding-box centre is the origin."""
    out = mesh.copy()
    out.apply_translation(-mesh.bounds.mean(axis=0))
    return out


def mesh_iou(mesh: trimesh.Trimesh, obj: WorldObject, scale_to_truth: bool = False, resolution: int = GRID_RESOLUTION,
             bound: float = GRID_BOUND) -> float:
    """Volumetric IoU of the centred mesh and the true object (no rotation; no scaling unless
    ``scale_to_truth``, which scales the mesh uniformly so its largest bounding-box extent equals
    the truth's)."""
    mesh = centred(mesh)
    if scale_to_truth:
        lo, hi = obj.bounds()
        mesh.apply_scale(float((hi - lo).max()) / float(mesh.extents.max()))
    return iou(voxelize_mesh(mesh, resolution, bound), true_occupancy(obj, resolution, bound))


#: yaws tried by :func:`facing_iou`: -45 to 45 degrees, 5 apart (a cube's or a pyramid's every facing)
FACING_YAWS = tuple(range(-45, 50, 5))


def facing_iou(mesh: trimesh.Trimesh, obj: WorldObject, yaws: tuple[float, ...] = FACING_YAWS, resolution: int = GRID_RESOLUTION,
               bound: float = GRID_BOUND) -> tuple[float, float]:
    """A diagnostic beside the benchmark's IoU (which counts facing): the best :func:`mesh_iou` over
    turns of the mesh about the vertical (+Z) axis, and the turn. Returns (IoU, yaw in degrees):
    the mesh faces ``yaw`` degrees counter-clockwise (seen from above) from the truth, so a right
    shape that faces the wrong way shows a high IoU here and a low one unturned."""
    truth = true_occupancy(obj, resolution, bound)
    best = (-1.0, 0.0)
    for yaw in yaws:
        turned = centred(mesh)
        turned.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(-float(yaw)), [0.0, 0.0, 1.0]))
        best = max(best, (iou(voxelize_mesh(centred(turned), resolution, bound), truth), float(yaw)), key=lambda v: (v[0], -abs(v[1])))
    return best


def sdf_normals(obj: WorldObject, points: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(N, 3) points -> (N, 3) unit normals: the central-difference gradient of the object's SDF
    (step ``eps``), normalised. Outward on the surface; off it, the direction away from the
    nearest surface point."""
    offsets = torch.eye(3, dtype=points.dtype) * eps
    grad = torch.stack([(obj.sdf(points + o) - obj.sdf(points - o)) / (2 * eps) for o in offsets], dim=-1)
    return grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def project_to_surface(obj: WorldObject, points: torch.Tensor, iterations: int = 2, eps: float = 1e-4) -> torch.Tensor:
    """(N, 3) points -> (N, 3) their nearest points on the object's surface: ``p - sdf(p) * n`` with
    the normal ``n`` the normalised central-difference gradient of the SDF, repeated."""
    for _ in range(iterations):
        points = points - obj.sdf(points)[:, None] * sdf_normals(obj, points, eps)
    return points


def colour_error(mesh: trimesh.Trimesh, obj: WorldObject) -> float:
    """Mean over the centred mesh's vertices of the mean absolute RGB difference (in [0, 1])
    between the vertex colour and the true colour at the nearest true surface point."""
    points = torch.from_numpy(np.asarray(centred(mesh).vertices, dtype=np.float64))
    with torch.no_grad():
        truth = obj.colour(project_to_surface(obj, points)).numpy()
    colours = np.asarray(mesh.visual.vertex_colors[:, :3], dtype=np.float64) / 255.0
    return float(np.abs(colours - truth).mean())


def sphere_iou(obj: WorldObject, resolution: int = GRID_RESOLUTION, bound: float = GRID_BOUND) -> float:
    """IoU against the object of the centred sphere whose radius (0.20 to 0.60 by 0.01) matches it
    best: what a shapeless density blob scores for free. Cached per noun."""
    key = (obj.noun, resolution, float(bound))
    if key not in _SPHERE_IOU:
        truth = true_occupancy(obj, resolution, bound)
        radius = np.linalg.norm(grid_centres(resolution, bound), axis=-1)
        _SPHERE_IOU[key] = max(iou(radius <= r, truth) for r in SPHERE_RADII)
    return _SPHERE_IOU[key]


def geometric_r_precision(mesh: trimesh.Trimesh, true_noun: str, resolution: int = GRID_RESOLUTION, bound: float = GRID_BOUND) -> dict:
    """IoU of the centred mesh against all 16 objects. Returns ``best_noun`` (the best match),
    ``true_iou``, ``best_other_iou`` (the best of the other 15), ``sphere_iou`` (the free baseline
    for the true object) and ``hit`` (the true object is the strictly best match)."""
    occupancy = voxelize_mesh(centred(mesh), resolution, bound)
    objects = {obj.noun: obj for obj in all_objects()}
    if true_noun not in objects:
        raise ValueError(f"unknown noun {true_noun!r}; expected one of {', '.join(objects)}")
    ious = {noun: iou(occupancy, true_occupancy(obj, resolution, bound)) for noun, obj in objects.items()}
    best_other = max(v for noun, v in ious.items() if noun != true_noun)
    return {
        "best_noun": max(ious, key=ious.get),
        "true_iou": ious[true_noun],
        "best_other_iou": best_other,
        "sphere_iou": sphere_iou(objects[true_noun], resolution, bound),
        "hit": ious[true_noun] > best_other,
    }


def true_mesh(obj: WorldObject, resolution: int = 128) -> trimesh.Trimesh:
    """The object's own marching-cubes mesh with its true vertex colours: the benchmark's ceiling.

    The grid covers the object's bounding box plus four voxels; the density ``max(0, 0.1 - sdf)``
    is linear in the SDF near the surface, so extracting at level 0.1 puts the vertices on the
    true surface (sdf = 0). An SDF has no voids to fill: the export's void filling, which would fill
    the torus's inner crevice, stays off."""
    lo, hi = obj.bounds()
    extent = float(torch.maximum(lo.abs(), hi.abs()).max())
    bound = extent * (1.0 + 8.0 / resolution)
    band = 0.1
    return extract_mesh(lambda p: (band - obj.sdf(p)).clamp_min(0.0), obj.colour, resolution=resolution, bound=bound, threshold=band,
                        fill_voids="none")


# ----------------------------------------------------------------------------- surface measures

#: area-weighted samples of a mesh's surface per measure, drawn with this seed: the same mesh scores
#: the same every time
SURFACE_SAMPLES = 20000
SURFACE_SEED = 0


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) vertices, (F, 3) faces -> (F, 3) unit normals (counter-clockwise winding seen from
    outside points outward; zero for a degenerate face) and (F,) areas."""
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    return cross / np.maximum(double_area, 1e-300)[:, None], 0.5 * double_area


def surface_samples(vertices: np.ndarray, faces: np.ndarray, count: int = SURFACE_SAMPLES,
                    seed: int = SURFACE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points drawn uniformly by area on a triangle mesh: (count, 3) points and (count,)
    the index of the face each lies on. A face is drawn with probability proportional to its area,
    then a point uniformly inside it (the square-root rule on two uniform numbers); a fixed
    ``seed`` makes them the same every time."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    _, area = face_normals(vertices, faces)
    if len(faces) == 0 or area.sum() <= 0:
        raise ValueError("the mesh has no surface to sample")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(count)), rng.random(count)
    bary = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)
    return np.einsum("nk,nkc->nc", bary, vertices[faces[face]]), face


def angle_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 3), (N, 3) unit vectors -> (N,) the angle between each pair, in degrees (0 to 180)."""
    return np.degrees(np.arccos(np.clip((a * b).sum(axis=-1), -1.0, 1.0)))


def weighted_std(values: np.ndarray, weights: np.ndarray) -> float:
    """(N, C) values, (N,) weights >= 0 -> the root of the weighted mean over rows and channels of
    the squared deviation from the weighted mean row: for colours c = c0 + noise of standard
    deviation s in each channel, s."""
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    if total <= 0:
        return 0.0
    values = np.asarray(values, dtype=np.float64).reshape(len(weights), -1)
    mean = (weights[:, None] * values).sum(axis=0) / total
    return float(np.sqrt((weights[:, None] * (values - mean) ** 2).sum() / (total * values.shape[1])))


def vertex_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V,) the area of the surface each vertex stands for: a third of each face it belongs to."""
    _, area = face_normals(vertices, faces)
    return np.bincount(np.asarray(faces, dtype=np.int64).ravel(), weights=np.repeat(area / 3.0, 3), minlength=len(vertices))


#: colour noise leaves out the vertices this close (world units) to a second part's surface: a vertex
#: on the boundary between two colours takes one or the other, which is neither part's speckle
PART_BOUNDARY_MARGIN = 0.01


def colour_noise(mesh: trimesh.Trimesh, obj: WorldObject, margin: float = PART_BOUNDARY_MARGIN) -> float:
    """How speckled flat colours are: the vertex colours (RGB in [0, 1]) grouped by the true part
    that owns each vertex's nearest true surface point, the area-weighted standard deviation of
    each group (:func:`weighted_std`, vertices weighted by :func:`vertex_areas`), averaged over the
    parts weighted by their area. Vertices whose nearest surface point is within ``margin`` of
    another part's surface are left out (:data:`PART_BOUNDARY_MARGIN`). 0 for a mesh whose parts
    are each one colour, whatever colour."""
    mesh = centred(mesh)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    with torch.no_grad():
        distances = obj.part_sdfs(project_to_surface(obj, torch.from_numpy(vertices))).abs().numpy()  # (V, P)
    part = distances.argmin(axis=1)
    weights = vertex_areas(vertices, mesh.faces)
    if distances.shape[1] > 1:
        nearest_two = np.sort(distances, axis=1)[:, :2]
        weights = np.where(nearest_two[:, 1] - nearest_two[:, 0] >= margin, weights, 0.0)
    colours = np.asarray(mesh.visual.vertex_colors[:, :3], dtype=np.float64) / 255.0
    total = weights.sum()
    if total <= 0:
        return 0.0
    return float(sum(weights[part == p].sum() / total * weighted_std(colours[part == p], weights[part == p]) for p in np.unique(part)))


def surface_measures(mesh: trimesh.Trimesh, obj: WorldObject, samples: int = SURFACE_SAMPLES, seed: int = SURFACE_SEED) -> dict:
    """How clean the centred mesh is against the true object's exact surface, on ``samples``
    area-weighted points of its surface (:func:`surface_samples`, seeded):

    - ``surface_distance``: the mean |SDF| at the points (world units);
    - ``normal_error_median``, ``normal_error_p90``: the median and 90th percentile of the angle
      (degrees) between the normal of the mesh's face at each point and the true normal there (the
      SDF's normalised gradient, :func:`sdf_normals`);
    - ``colour_noise``: :func:`colour_noise`;
    - ``faces``: the mesh's face count."""
    centred_mesh = centred(mesh)
    vertices, faces = np.asarray(centred_mesh.vertices, dtype=np.float64), np.asarray(centred_mesh.faces, dtype=np.int64)
    points, face = surface_samples(vertices, faces, samples, seed)
    normals, _ = face_normals(vertices, faces)
    with torch.no_grad():
        p = torch.from_numpy(points)
        distance = obj.sdf(p).abs().numpy()
        truth = sdf_normals(obj, p).numpy()
    angles = angle_degrees(normals[face], truth)
    return {
        "surface_distance": float(distance.mean()),
        "normal_error_median": float(np.median(angles)),
        "normal_error_p90": float(np.percentile(angles, 90)),
        "colour_noise": colour_noise(mesh, obj),
        "faces": int(len(faces)),
    }


# ----------------------------------------------------------------------------- what you see is what you export

#: the field covers a pixel where its rendered opacity exceeds this: the silhouettes that the export's
#: surface level is chosen to match (:func:`dreamfusion.export.silhouette_level`)
RENDER_OPACITY = 0.5


def _array(value: np.ndarray | torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def render_match(coverage: np.ndarray | torch.Tensor, colour: np.ndarray | torch.Tensor, opacity: np.ndarray | torch.Tensor,
                 field_colour: np.ndarray | torch.Tensor, level: float = RENDER_OPACITY) -> dict:
    """How the renders of an exported mesh match the field's renders from the same cameras:

    - ``render_silhouette_iou``: IoU, over all views' pixels together, of the pixels the mesh covers
      and those where the field's opacity exceeds ``level``;
    - ``render_colour_diff``: over the pixels both cover, the mean absolute RGB difference (0..1,
      averaged over the channels, as :func:`colour_error`) between the mesh's colour and the
      field's (None when no pixel is covered by both).

    ``coverage`` (B, H, W) or (B, 1, H, W) bool and ``colour`` (B, 3, H, W) of the mesh's renders
    (:func:`dreamfusion.mesh_render.render_mesh`); ``opacity`` (B, H, W) or (B, 1, H, W) and
    ``field_colour`` (B, 3, H, W) of the field's. Compare like with like: albedo with albedo (the
    field's albedo render divided by its opacity), or lit with lit under the same lights."""
    covered = _array(coverage).astype(bool)
    b = covered.shape[0]
    covered = covered.reshape(b, -1)
    solid = _array(opacity).reshape(b, -1) > level
    union = np.logical_or(covered, solid).sum()
    both = covered & solid
    difference = np.abs(_array(colour).astype(np.float64).reshape(b, 3, -1) - _array(field_colour).astype(np.float64).reshape(b, 3, -1))
    return {
        "render_silhouette_iou": float(both.sum() / union) if union else 1.0,
        "render_colour_diff": float(difference.mean(axis=1)[both].mean()) if both.any() else None,
    }
