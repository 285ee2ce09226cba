"""Cameras, lights and view labels: the one definition of the distribution that both SDS
training and the embedded prior's training data draw from.

Frame (``shared/world/SPEC.md``): right-handed, +Z up, the object's front faces +X. Azimuth
``phi`` is measured in the XY plane from +X towards +Y, elevation ``theta`` from the XY plane
towards +Z; the camera looks at the origin and, from the front camera, +Y is on the image's right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import LEGACY_CAMERA, CameraConfig  # noqa: F401 - re-exported: the camera distribution lives with the other settings

VIEW_LABELS = ("front view", "side view", "back view", "overhead view")


#: the camera of previews, turntables and contact sheets: the middle of the training framing
VIEW_DISTANCE = 1.9
VIEW_FOCAL = 1.27


@dataclass
class Cameras:
    """A batch of pinhole cameras. Shapes: ``c2w`` (B, 3, 4) with columns right, up, back
    (OpenGL convention, the camera looks along -back), position last; ``focal`` (B,) as a multiple
    of the image width; angles (B,) in degrees."""

    c2w: torch.Tensor
    focal: torch.Tensor
    azimuth: torch.Tensor
    elevation: torch.Tensor
    distance: torch.Tensor

    @property
    def position(self) -> torch.Tensor:
        return self.c2w[:, :, 3]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, idx: int | slice | torch.Tensor) -> Cameras:
        """A sub-batch (an index, slice or mask; an int keeps the batch dimension)."""
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return Cameras(self.c2w[idx], self.focal[idx], self.azimuth[idx], self.elevation[idx], self.distance[idx])

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(*(t.to(device) for t in (self.c2w, self.focal, self.azimuth, self.elevation, self.distance)))


@dataclass
class Lights:
    """Point lights. ``position`` (B, 3), ``intensity`` (B,), ``ambient`` (B,)."""

    position: torch.Tensor
    intensity: torch.Tensor
    ambient: torch.Tensor

    def __getitem__(self, idx: int | slice | torch.Tensor) -> Lights:
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return Lights(self.position[idx], self.intensity[idx], self.ambient[idx])

    def to(self, device: torch.device | str) -> Lights:
        return Lights(self.position.to(device), self.intensity.to(device), self.ambient.to(device))


def view_label(azimuth_deg: float, elevation_deg: float) -> str:
    """The SPEC's view label: overhead if theta >= 60, else front/back within 45 deg of 0/180."""
    if elevation_deg >= 60.0:
        return "overhead view"
    phi = azimuth_deg % 360.0
    dist_front = min(phi, 360.0 - phi)
    if dist_front <= 45.0:
        return "front view"
    if abs(phi - 180.0) <= 45.0:
        return "back view"
    return "side view"


def spherical_to_position(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """(B,) angles in degrees and distance -> (B, 3) positions."""
    phi = torch.deg2rad(azimuth_deg)
    theta = torch.deg2rad(elevation_deg)
    return torch.stack(
        [distance * torch.cos(theta) * torch.cos(phi), distance * torch.cos(theta) * torch.sin(phi), distance * torch.sin(theta)],
        dim=-1,
    )


def look_at(position: torch.Tensor, azimuth_deg: torch.Tensor) -> torch.Tensor:
    """(B, 3) camera positions looking at the origin -> (B, 3, 4) camera-to-world matrices.

    The right vector is derived from the azimuth rather than from a cross product with +Z, so a
    camera straight overhead (theta = 90) is still well defined."""
    back = position / position.norm(dim=-1, keepdim=True)
    phi = torch.deg2rad(azimuth_deg)
    # right = direction of increasing azimuth's opposite: at phi=0 the camera sits on +X looking
    # at -X, and +Y must appear on the image's right.
    right = torch.stack([-torch.sin(phi), torch.cos(phi), torch.zeros_like(phi)], dim=-1)
    up = torch.cross(back, right, dim=-1)
    return torch.stack([right, up, back, position], dim=-1)


def make_cameras(azimuth: float | torch.Tensor, elevation: float | torch.Tensor, distance: float | torch.Tensor,
                 focal: float | torch.Tensor) -> Cameras:
    """Cameras from angles in degrees (tensors or floats broadcast to a batch)."""
    az, el, dist, f = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32) for v in (azimuth, elevation, distance, focal)))
    az, el, dist, f = (v.reshape(-1) for v in (az, el, dist, f))
    return Cameras(look_at(spherical_to_position(az, el, dist), az), f, az, el, dist)


def _uniform(lo_hi: tuple[float, float], n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def sample_cameras(cfg: CameraConfig, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Cameras:
    """Draw ``n`` random cameras. Elevation is drawn uniformly in sin(theta) would bias towards
    the equator; the paper draws angles uniformly, and so does this."""
    az = _uniform(cfg.azimuth_range, n, generator, device) % 360.0
    el = _uniform(cfg.elevation_range, n, generator, device)
    dist = _uniform(cfg.distance_range, n, generator, device)
    f = _uniform(cfg.focal_range if cfg.zoom_range is None else cfg.zoom_range, n, generator, device)
    if cfg.zoom_range is not None:
        f = f * dist
    return Cameras(look_at(spherical_to_position(az, el, dist), az), f, az, el, dist)


def sample_lights(cfg: CameraConfig, cameras: Cameras, generator: torch.Generator | None = None) -> Lights:
    """A point light near each camera, with random intensity and ambient term."""
    n, device = len(cameras), cameras.c2w.device
    jitter = torch.randn(n, 3, generator=generator, device=device) * cfg.light_jitter
    return Lights(
        cameras.position + jitter,
        _uniform(cfg.light_intensity_range, n, generator, device),
        _uniform(cfg.ambient_range, n, generator, device),
    )


def sample_backgrounds(n: int, random_fraction: float, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Background colours of ``n`` renders, (n, 3): each is a uniformly random solid RGB colour with
    probability ``random_fraction``, else white (the engine's default). The one definition that the
    embedded prior's training renders and SDS share: on a random colour a white or grey object is
    visible, so its pixels can only be made by opaque surface, not by thinning it into the white."""
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random background fraction must be between 0 and 1, got {random_fraction}")
    colours = torch.rand(n, 3, generator=generator, device=device)
    coloured = torch.rand(n, generator=generator, device=device) < random_fraction
    return torch.where(coloured[:, None], colours, torch.ones_like(colours))


def default_light(cameras: Cameras, intensity: float = 0.75, ambient: float = 0.2) -> Lights:
    """A light at the camera: what viewers and exports use unless told otherwise."""
    n = len(cameras)
    dev = cameras.c2w.device
    return Lights(cameras.position.clone(), torch.full((n,), intensity, device=dev), torch.full((n,), ambient, device=dev))


def camera_rays(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres. Returns origins and unit directions, each (B, H, W, 3).
    Row 0 is the top of the image."""
    device = cameras.c2w.device
    rows, cols = torch.arange(height, device=device, dtype=torch.float32), torch.arange(width, device=device, dtype=torch.float32)
    j, i = torch.meshgrid(rows, cols, indexing="ij")
    f = cameras.focal[:, None, None] * width  # pixels
    x = (i[None] + 0.5 - width / 2) / f
    y = -(j[None] + 0.5 - height / 2) / f
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (B, H, W, 3)
    rot = cameras.c2w[:, :, :3]
    dirs = torch.einsum("bij,bhwj->bhwi", rot, dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cameras.position[:, None, None, :].expand_as(dirs)
    return origins, dirs


def ray_box(origins: torch.Tensor, dirs: torch.Tensor, lo: float | torch.Tensor,
            hi: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the box [lo, hi] (scalars or (3,) corners).
    (N, 3), (N, 3) -> near (N,), far (N,), hit (N,) bool."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (lo - origins) * inv
    t1 = (hi - origins) * inv
    near = torch.minimum(t0, t1).max(dim=-1).values.clamp_min(0.0)
    far = torch.maximum(t0, t1).min(dim=-1).values
    return near, far, far > near


def orbit_cameras(n: int, elevation: float = 20.0, distance: float = VIEW_DISTANCE, focal: float = VIEW_FOCAL) -> Cameras:
    """``n`` cameras evenly spaced in azimuth, starting from the front: turntables and previews."""
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return make_cameras(az, elevation, distance, focal)


def fov_degrees(focal: float) -> float:
    """Horizontal field of view of a focal length given as a multiple of the image width."""
    return math.degrees(2 * math.atan(0.5 / focal))


# ----------------------------------------------------------------------------- render conditions

SHADING_MODE_CODES = ("lit", "textureless", "albedo")
#: length of :func:`render_condition_features`
RENDER_CONDITION_FEATURES = 17
#: which entries of :func:`render_condition_features` say what (name -> slice)
RENDER_CONDITION_GROUPS: dict[str, slice] = {
    "azimuth": slice(0, 4), "elevation": slice(4, 6), "distance and focal": slice(6, 8), "light": slice(8, 13),
    "shading mode": slice(13, 16), "constant": slice(16, 17),
}


def render_condition_features(cameras: Cameras, lights: Lights, modes: list[str], present: torch.Tensor | None = None) -> torch.Tensor:
    """What a camera-aware prior is told about each render: (B, 17) features.

    ``[sin az, cos az, sin 2az, cos 2az, elevation / 90, sin el, (distance - 1.9) / 0.3,
    (focal - 1.35) / 0.2, light direction in the camera's (right, up, back) frame (3),
    (intensity - 0.7) / 0.2, (ambient - 0.15) / 0.1, one-hot shading mode (lit, textureless,
    albedo), 1]``. The fixed offsets and scales (not the config's ranges) keep a feature's meaning
    the same whatever distribution the cameras came from. ``present`` (B,) bool: rows where it is
    False are all zeros, the last entry included (conditions dropped: the prior must guess)."""
    az, el = torch.deg2rad(cameras.azimuth), torch.deg2rad(cameras.elevation)
    to_light = lights.position / lights.position.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    light_cam = torch.einsum("bij,bi->bj", cameras.c2w[:, :, :3], to_light)  # components along right, up, back
    unknown = [m for m in modes if m not in SHADING_MODE_CODES]
    if unknown or len(modes) != len(cameras):
        raise ValueError(f"need one shading mode of {SHADING_MODE_CODES} per camera, got {modes}")
    onehot = torch.zeros(len(cameras), 3, device=az.device)
    onehot[torch.arange(len(cameras)), torch.tensor([SHADING_MODE_CODES.index(m) for m in modes])] = 1.0
    feats = torch.cat([
        torch.stack([az.sin(), az.cos(), (2 * az).sin(), (2 * az).cos(), cameras.elevation / 90.0, el.sin(),
                     (cameras.distance - 1.9) / 0.3, (cameras.focal - 1.35) / 0.2], dim=-1),
        light_cam,
        torch.stack([(lights.intensity - 0.7) / 0.2, (lights.ambient - 0.15) / 0.1], dim=-1),
        onehot,
        torch.ones(len(cameras), 1, device=az.device),
    ], dim=-1)
    if present is not None:
        feats = feats * present.to(feats.dtype)[:, None]
    return feats


#: channels of :func:`ray_condition_maps`
RAY_CONDITION_CHANNELS = 6
#: what the last three channels of :func:`ray_condition_maps` hold
RAY_MAP_KINDS = ("plucker", "nearest")


def ray_condition_maps(cameras: Cameras, size: int, kind: str = "plucker") -> torch.Tensor:
    """Per-pixel camera conditions for a prior, (B, 6, size, size) in world coordinates: each
    pixel's unit ray direction d, then with ``kind`` "plucker" the moment o x d (Plücker
    coordinates, as CAT3D and SPAD use), or with "nearest" the ray's point nearest the origin,
    p = o - (o . d) d (the world point the pixel looks through at the object's centre depth).
    Both fix the ray (o x d = p x d), but p is linear in what decides whether a centred object
    covers the pixel (which of its parts lie near p along d), where the moment gives p only as the
    product d x m. (That "nearest" is easier to learn is a hypothesis: warm-started from a Plücker
    prior it was not picked up in 500 steps, docs/prior.md.)"""
    if kind not in RAY_MAP_KINDS:
        raise ValueError(f"unknown ray map {kind!r}; valid: {', '.join(RAY_MAP_KINDS)}")
    origins, dirs = camera_rays(cameras, size, size)  # (B, S, S, 3)
    if kind == "plucker":
        second = torch.cross(origins, dirs, dim=-1)
    else:
        second = origins - (origins * dirs).sum(dim=-1, keepdim=True) * dirs
    return torch.cat([dirs, second], dim=-1).permute(0, 3, 1, 2).contiguous()
