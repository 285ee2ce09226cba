"""The scene: a dense voxel grid of raw density and albedo inside [-bound, bound]^3, plus the
DreamFusion density "blob" and a background model of the ray direction.

Why a dense grid: on a 2-core CPU a trilinear lookup (one ``grid_sample`` for all channels) costs
a few milliseconds per 100k samples, where even a small MLP costs tens; at the render sizes the
embedded prior works at, a 48^3 grid has detail to spare (see benchmarks/speed.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FieldConfig

BACKGROUNDS = ("white", "black", "mlp")


def blob_bias(points: torch.Tensor, strength: float, radius: float, inner_scale: float = 1.0) -> torch.Tensor:
    """DreamFusion's density bias lambda * (1 - |x| / c): (N, 3) -> (N,). ``inner_scale`` scales
    its positive part (inside the radius) only: the blob that starts a run can fade out of the way
    while the space outside stays biased towards empty."""
    bias = strength * (1.0 - points.norm(dim=-1) / radius)
    return torch.where(bias > 0, bias * inner_scale, bias) if inner_scale != 1.0 else bias


def blob_bias_gradient(points: torch.Tensor, strength: float, radius: float, inner_scale: float = 1.0) -> torch.Tensor:
    """Gradient of :func:`blob_bias` with respect to the points: (N, 3) -> (N, 3)."""
    norm = points.norm(dim=-1, keepdim=True)
    grad = -strength / radius * points / norm.clamp_min(1e-6)
    return torch.where(norm < radius, grad * inner_scale, grad) if inner_scale != 1.0 else grad


def density_activation(raw: torch.Tensor, kind: str = "softplus", beta: float = 0.01) -> torch.Tensor:
    """Raw density -> density >= 0: ``softplus`` or ``exp`` (truncated at e^15, where a voxel is
    opaque many times over, so one bad step cannot overflow), or ``laplace``: the raw value is a
    signed distance (positive inside) and the density VolSDF's (1 / beta) Psi_beta(raw), Psi the
    Laplace distribution's CDF of scale ``beta``."""
    if kind == "laplace":
        e = 0.5 * torch.exp(-raw.abs() / beta)
        return torch.where(raw >= 0, 1.0 - e, e) / beta
    if kind == "exp":
        return torch.exp(raw.clamp(max=15.0))
    return F.softplus(raw)


def grid_resolution(cfg: FieldConfig, fraction_done: float) -> int:
    """The grid's resolution at a point of the run under coarse-to-fine growth: with coarse
    resolutions r_1 < ... < r_n and fraction f, stage k = floor(fraction / (f / n)) (r_{k+1}, or
    the final resolution once k >= n)."""
    stages = list(cfg.coarse_resolutions)
    if not stages:
        return cfg.resolution
    k = int(fraction_done * len(stages) / cfg.coarse_fraction) if cfg.coarse_fraction > 0 else len(stages)
    return stages[k] if k < len(stages) else cfg.resolution


def upsample_grid(grid: torch.Tensor, resolution: int) -> torch.Tensor:
    """Trilinear resampling of a (1, C, R, R, R) grid whose nodes span the same box at both
    resolutions (``align_corners``): the field it interpolates stays the same where it was smooth."""
    return F.interpolate(grid, size=(resolution,) * 3, mode="trilinear", align_corners=True)


def trilinear_corners(coords: torch.Tensor, size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight grid nodes and weights of a trilinear lookup, as ``F.grid_sample`` computes them
    (``align_corners=True``, border padding): ``coords`` (N, 3) are (x, y, z) in [-1, 1] over a
    volume of ``size`` (D, H, W). Returns flat node indices into D * H * W and weights, each (N, 8),
    in grid_sample's corner order (x fastest, then y, then z). A node past the last one (a point on
    the far face) is clamped onto it with weight exactly 0, where grid_sample skips it."""
    d, h, w = size
    axes = []
    for col, n in ((0, w), (1, h), (2, d)):
        pos = (((coords[:, col] + 1) / 2) * (n - 1)).clamp(0, n - 1)  # the same float operations as ATen
        lo = pos.floor()
        hi = lo + 1
        axes.append(((hi - pos, pos - lo), (lo.long(), hi.long().clamp_max(n - 1))))
    (wx, x), (wy, y), (wz, z) = axes
    weights, nodes = [], []
    for c in (0, 1):
        for b in (0, 1):
            for a in (0, 1):
                weights.append(wx[a] * wy[b] * wz[c])
                nodes.append((z[c] * h + y[b]) * w + x[a])
    return torch.stack(nodes, 1), torch.stack(weights, 1)


def trilinear_volume_grad(grad_out: torch.Tensor, coords: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gradient ``F.grid_sample``'s backward gives its (1, C, D, H, W) volume, bit for bit, for
    a lookup at ``coords`` (N, 3) with output gradient ``grad_out`` (C * N values): every point's
    weighted gradient added to its eight nodes, point after point as ATen adds them (so each sum
    rounds the same way), but as one vectorised ``index_add_`` per channel instead of ATen's
    scalar loop over points: 2-3x faster on a CPU."""
    channels, size = shape[1], tuple(shape[2:])
    nodes, weights = trilinear_corners(coords, size)
    flat = nodes.reshape(-1)
    grad = grad_out.reshape(channels, -1)
    out = torch.zeros(channels, size[0] * size[1] * size[2], dtype=grad_out.dtype, device=grad_out.device)
    for c in range(channels):
        out[c].index_add_(0, flat, (weights * grad[c, :, None]).reshape(-1))
    return out.view(shape)


class _TrilinearLookup(torch.autograd.Function):
    """``F.grid_sample`` (trilinear, border, align_corners) of a volume at fixed points, with
    :func:`trilinear_volume_grad` as its backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coords)
        ctx.volume_shape = volume.shape
        return F.grid_sample(volume, coords, mode="bilinear", padding_mode="border", align_corners=True)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (coords,) = ctx.saved_tensors
        return trilinear_volume_grad(grad_out, coords.reshape(-1, 3), ctx.volume_shape), None


def gaussian_blur_3d(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1, C, D, H, W) volume blurred with a separable Gaussian of standard deviation ``sigma``
    voxels (truncated at 3 sigma; the edges replicated, as the field's lookup clamps)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = volume.shape[1]
    out = volume
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape).expand(c, 1, *shape[2:]).contiguous(), groups=c)
    return out


def signed_distance_grid(inside: np.ndarray, voxel: float) -> np.ndarray:
    """Signed distance (positive inside, world units) at the nodes of a grid from which nodes are
    inside: the Euclidean distance to the nearest node on the other side, less half a voxel (the
    surface lies between the two), times ``voxel``. All inside or all outside: +-(a grid's diagonal)."""
    from scipy.ndimage import distance_transform_edt

    if inside.all() or not inside.any():
        return np.full(inside.shape, (1.0 if inside.all() else -1.0) * voxel * np.sqrt(3) * max(inside.shape), dtype=np.float32)
    to_outside = distance_transform_edt(inside)
    to_inside = distance_transform_edt(~inside)
    return (np.where(inside, to_outside - 0.5, -(to_inside - 0.5)) * voxel).astype(np.float32)


class GridField(nn.Module):
    """Raw density (1 channel) and albedo logits (3 channels) on (R, R, R) grids, laid out as
    ``grid_sample`` expects: (1, C, z, y, x). Two parameters, so each can have its own learning
    rate."""

    def __init__(self, cfg: FieldConfig | None = None, resolution: int | None = None):
        super().__init__()
        cfg = cfg or FieldConfig()
        self.cfg = cfg
        r = resolution or grid_resolution(cfg, 0.0)
        self.density_grid = nn.Parameter(torch.zeros(1, 1, r, r, r))
        self.albedo_grid = nn.Parameter(torch.zeros(1, 3, r, r, r))
        # the strength of the blob's inside (1 at the start; it fades under FieldConfig.blob_fade_steps)
        self.register_buffer("blob_scale", torch.ones(()))
        # 0 while the raw grid is a density; > 0 once it is a signed distance (FieldConfig.sdf_fraction):
        # the scale of its Laplace density now
        self.register_buffer("sdf_beta", torch.zeros(()))

    @property
    def resolution(self) -> int:
        return self.density_grid.shape[-1]

    @property
    def voxel_size(self) -> float:
        return 2 * self.cfg.bound / (self.resolution - 1)

    @torch.no_grad()
    def grow(self, resolution: int) -> None:
        """Resample both grids to ``resolution`` per side (coarse-to-fine training); the parameters
        are replaced, so an optimiser over the old ones must be rebuilt."""
        self.density_grid = nn.Parameter(upsample_grid(self.density_grid.data, resolution))
        self.albedo_grid = nn.Parameter(upsample_grid(self.albedo_grid.data, resolution))

    def load_grids(self, density: torch.Tensor, albedo: torch.Tensor) -> None:
        """Take grids of any resolution (a checkpoint of a run that grew its grid)."""
        if density.shape != self.density_grid.shape:
            self.density_grid = nn.Parameter(torch.zeros_like(density, device=self.density_grid.device))
            self.albedo_grid = nn.Parameter(torch.zeros_like(albedo, device=self.albedo_grid.device))
        with torch.no_grad():
            self.density_grid.copy_(density)
            self.albedo_grid.copy_(albedo)

    def _sample(self, volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Trilinear lookup: (1, C, R, R, R) volume at (N, 3) points -> (N, C)."""
        coords = (points / self.cfg.bound).view(1, 1, 1, -1, 3)
        if volume.is_cuda or coords.requires_grad:  # CUDA's own backward is fast; a gradient to the points needs ATen's
            out = F.grid_sample(volume, coords, mode="bilinear", padding_mode="border", align_corners=True)
        else:
            out = _TrilinearLookup.apply(volume, coords)
        return out.view(volume.shape[1], -1).t()

    def _raw_gradient_volume(self) -> torch.Tensor:
        """Central differences of the raw density grid: (1, 3, R, R, R) with channels (d/dx, d/dy, d/dz)."""
        raw = self.density_grid[0, 0]
        gz, gy, gx = torch.gradient(raw, spacing=self.voxel_size, dim=(0, 1, 2))
        return torch.stack([gx, gy, gz])[None]

    def node_points(self) -> torch.Tensor:
        """The grid's nodes as (R^3, 3) points (x, y, z), in the grid's (z, y, x) order."""
        axis = torch.linspace(-self.cfg.bound, self.cfg.bound, self.resolution, device=self.density_grid.device)
        z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
        return torch.stack([x, y, z], dim=-1).reshape(-1, 3)

    @property
    def is_sdf(self) -> bool:
        return float(self.sdf_beta) > 0

    def activation(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw value -> density: the configured activation, or once the grid is a signed distance
        the Laplace density of scale ``sdf_beta``."""
        if self.is_sdf:
            return density_activation(raw, "laplace", float(self.sdf_beta))
        return density_activation(raw, self.cfg.density_activation)

    @torch.no_grad()
    def to_sdf(self, level: float, beta: float, smoothing: float = 1.0) -> None:
        """Turn the density grid into a signed distance grid (positive inside) of the surface where
        the density is ``level`` (:func:`signed_distance_grid`, blurred by ``smoothing`` voxels),
        with the blob baked in; from now on the density is the Laplace density of scale ``beta``."""
        inside = self.activation(self.raw_density(self.node_points(), self.density_grid.reshape(-1))) > level
        r = self.resolution
        sdf = signed_distance_grid(inside.reshape(r, r, r).cpu().numpy(), self.voxel_size)
        sdf = torch.from_numpy(sdf).to(self.density_grid)[None, None]
        if smoothing > 0:
            sdf = gaussian_blur_3d(sdf, smoothing)
        self.density_grid.copy_(sdf)
        self.sdf_beta.fill_(beta)

    def raw_density(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Interpolated raw density (N,) plus the blob and the shift (a signed distance grid has them baked in)."""
        if self.is_sdf:
            return values
        return values + blob_bias(points, self.cfg.blob_density, self.cfg.blob_radius, float(self.blob_scale)) + self.cfg.density_shift

    def forward(self, points: torch.Tensor, with_normals: bool = True) -> dict[str, torch.Tensor]:
        """(N, 3) points -> ``density`` (N,), ``albedo`` (N, 3) in [0, 1] and, if asked,
        ``normals`` (N, 3): unit vectors along -grad(density), differentiable w.r.t. the grid."""
        parts = [self.density_grid, self.albedo_grid] + ([self._raw_gradient_volume()] if with_normals else [])
        values = self._sample(torch.cat(parts, dim=1), points)
        raw = self.raw_density(points, values[:, 0])
        out = {"density": self.activation(raw), "albedo": torch.sigmoid(values[:, 1:4])}
        if with_normals:
            grad = values[:, 4:7]
            if not self.is_sdf:
                grad = grad + blob_bias_gradient(points, self.cfg.blob_density, self.cfg.blob_radius, float(self.blob_scale))
            out["normals"] = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return out

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) density, no normals (occupancy updates, early ray termination, export): the
        density grid alone is looked up, the same values as :meth:`forward`'s."""
        raw = self.raw_density(points, self._sample(self.density_grid, points)[:, 0])
        return self.activation(raw)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points, with_normals=False)["albedo"]


class Background(nn.Module):
    """Colour seen where rays leave the scene: fixed, or a small MLP of the ray direction."""

    def __init__(self, kind: str = "white", hidden: int = 32):
        super().__init__()
        if kind not in BACKGROUNDS:
            raise ValueError(f"unknown background {kind!r}; expected one of {', '.join(BACKGROUNDS)}")
        self.kind = kind
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 3))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.constant_(self.mlp[2].bias, 3.0)  # starts white, like the fixed default

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        """(N, 3) unit directions -> (N, 3) colours."""
        if self.kind == "mlp":
            return torch.sigmoid(self.mlp(directions))
        value = 1.0 if self.kind == "white" else 0.0
        return torch.full_like(directions, value)
