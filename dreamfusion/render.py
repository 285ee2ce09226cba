"""Volume rendering with a nerfacc occupancy grid.

One renderer, two samplers that read the same ``nerfacc.OccGridEstimator``:

- on CUDA with nerfacc's compiled kernels: ``OccGridEstimator.sampling`` (packed samples);
- elsewhere (a CPU, or a GPU where nerfacc's extension cannot be built): a PyTorch sampler that
  marches every ray at the same step, looks each sample's cell up in the estimator's binary grid
  and evaluates the field only at occupied samples; weights come from nerfacc's batched
  ``render_weight_from_density``.

Both samplers march each ray from where it enters the scene's box, at the same step and with the
same stratified offset, so they give the same samples. Early ray termination follows either: the
samples met after a ray's transmittance has fallen below ``RenderConfig.early_stop_eps`` are
dropped before the field is evaluated with its normals (a solid object's inside costs nothing).

Random draws: every draw (the stratified offsets, the occupancy update's cells and points) is made
on the CPU from the ``generator`` passed in, then moved to the scene's device. A seed therefore
makes the same draws on any device, and the global generators (CPU and CUDA) are never touched.

Shading happens per sample (``dreamfusion.shading``) and is composited over the background.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import nerfacc
import torch
from torch.profiler import record_function

from .cameras import Cameras, Lights, camera_rays, ray_box
from .config import RenderConfig
from .field import Background, GridField
from .shading import SHADING_MODES, normals_to_rgb, shade

SAMPLERS = ("auto", "torch", "dense")


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the cube [-bound, bound]^3.
    (N, 3), (N, 3) -> near (N,), far (N,), hit (N,) bool."""
    return ray_box(origins, dirs, -bound, bound)


def march(near: torch.Tensor, far: torch.Tensor, step: float, n_steps: int, jitter: torch.Tensor | None = None,
          first: torch.Tensor | None = None, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples at a fixed step from ``near``: t_starts, t_ends (N, K) and a valid mask (N, K)
    for samples whose midpoint lies before ``far``. ``jitter`` (N, 1) in [0, 1) shifts each ray's
    samples by a fraction of a step (stratified training).

    ``first`` (N,) and ``count``: march only the steps ``first .. first + count - 1`` of each ray
    (of the ``n_steps`` from ``near``): the same sample positions as the full march, fewer of
    them to look at."""
    k = torch.arange(n_steps if count is None else count, device=near.device, dtype=near.dtype)[None]
    if first is not None:
        k = first.to(near.dtype)[:, None] + k
    offset = jitter if jitter is not None else torch.zeros_like(near)[:, None]
    t_starts = near[:, None] + (k + offset) * step
    t_ends = t_starts + step
    valid = (t_starts + t_ends) * 0.5 < far[:, None]
    if first is not None:
        valid &= k < n_steps
    return t_starts, t_ends, valid


def occupied_box(binaries: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Corners (lo, hi), each (3,), of the smallest box holding every occupied cell of a binary
    grid (R, R, R) indexed [x, y, z] over [-bound, bound]^3; None when no cell is occupied."""
    idx = binaries.nonzero()
    if idx.shape[0] == 0:
        return None
    cell = 2.0 * bound / binaries.shape[0]
    lo = -bound + idx.amin(dim=0).to(torch.float32) * cell
    hi = -bound + (idx.amax(dim=0) + 1).to(torch.float32) * cell
    return lo, hi


def occupied_cells(points: torch.Tensor, binaries: torch.Tensor, bound: float) -> torch.Tensor:
    """Look points (..., 3) up in a nerfacc binary grid (R, R, R) indexed [x, y, z] over
    [-bound, bound]^3. Returns a bool mask (...)."""
    return occupied_at(points[..., 0], points[..., 1], points[..., 2], binaries, bound)


def occupied_at(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, binaries: torch.Tensor, bound: float) -> torch.Tensor:
    """:func:`occupied_cells` of points given as three coordinate tensors of one shape: the
    sampler's (rays, steps) grids, looked up without building the (rays, steps, 3) points."""
    res = binaries.shape[0]
    inside, cells = None, []
    for coord in (x, y, z):
        idx = ((coord + bound) / (2 * bound) * res).floor().long()
        ok = (idx >= 0) & (idx < res)
        inside = ok if inside is None else inside & ok
        cells.append(idx.clamp(0, res - 1))
    return inside & binaries.reshape(-1)[(cells[0] * res + cells[1]) * res + cells[2]]


def _packed_optical_depth(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor,
                          ray_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed sample's sigma * dt and the sum of those before it on its ray, both float64:
    one running sum over all samples less its value at each ray's first sample (in float64, so a
    long ray's total cannot swamp the next ray's first steps)."""
    tau = (sigmas * (t_ends - t_starts)).double()
    exclusive = torch.cumsum(tau, 0) - tau
    start = torch.ones_like(ray_idx, dtype=torch.bool)
    start[1:] = ray_idx[1:] != ray_idx[:-1]
    ray_number = torch.cumsum(start.long(), 0) - 1
    return tau, exclusive - exclusive[start][ray_number]


def packed_transmittance(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, ray_idx: torch.Tensor) -> torch.Tensor:
    """Transmittance (S,) of packed samples (ray indices sorted) before each: exp(-sum of sigma *
    dt over the ray's earlier samples), 1 at a ray's first sample (nerfacc's
    ``render_transmittance_from_density``)."""
    if ray_idx.numel() == 0:
        return torch.ones_like(sigmas)
    _, before = _packed_optical_depth(t_starts, t_ends, sigmas, ray_idx)
    return torch.exp(-before).to(sigmas.dtype)


def packed_weights(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, ray_idx: torch.Tensor) -> torch.Tensor:
    """Volume-rendering weights (S,) of packed samples (ray indices sorted): transmittance times
    alpha = 1 - exp(-sigma * dt) (nerfacc's ``render_weight_from_density``), differentiable."""
    if ray_idx.numel() == 0:
        return torch.zeros_like(sigmas)
    tau, before = _packed_optical_depth(t_starts, t_ends, sigmas, ray_idx)
    return (torch.exp(-before) * -torch.expm1(-tau)).to(sigmas.dtype)


def depth_image(depth: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Depth maps (B, H, W) -> grey images (B, 3, H, W): near dark, far light, each image
    normalised over its own pixels with opacity > 0.5; white where nothing is."""
    out = torch.ones(depth.shape[0], 3, *depth.shape[1:], device=depth.device, dtype=depth.dtype)
    for i in range(depth.shape[0]):
        solid = opacity[i] > 0.5
        d = depth[i]
        norm = (d - d[solid].min()) / (d[solid].max() - d[solid].min() + 1e-6) if solid.any() else torch.zeros_like(d)
        grey = 1 - norm * opacity[i]
        out[i] = (grey * opacity[i] + (1 - opacity[i]))[None]
    return out


#: where nerfacc 0.5 keeps its compiled CUDA extension: the module's ``_C`` (built on first import
#: where a CUDA toolkit is found, None where none is); ``nerfacc.cuda``'s functions load it lazily
NERFACC_EXTENSION = "nerfacc.cuda._backend"


@functools.lru_cache(maxsize=1)
def nerfacc_extension() -> object | None:
    """nerfacc's compiled CUDA extension, or None where it cannot be had (no CUDA toolkit to build
    it, a failed build). The first call may compile it (minutes, once per machine); the answer is
    kept for the process, so a failed build is not retried at every render."""
    try:
        module = importlib.import_module(NERFACC_EXTENSION)
    except Exception:  # noqa: BLE001 - a missing toolkit or a failed build: the PyTorch sampler is used
        return None
    return getattr(module, "_C", None)


def cuda_sampler_available(device: torch.device | str) -> bool:
    """nerfacc's ray marching (and its packed compositing) need a CUDA device and nerfacc's compiled
    extension; never touches the extension for another device."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return nerfacc_extension() is not None


def stratified_offsets(n_rays: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Each ray's offset (n_rays, 1) in [0, 1) of a step for stratified sampling: drawn on the CPU
    from ``generator`` (torch's global CPU generator when None), then moved to ``device``."""
    return torch.rand(n_rays, 1, generator=generator).to(device)


@torch.no_grad()
def occupancy_update(estimator: nerfacc.OccGridEstimator, step: int, occ_eval_fn: Callable[[torch.Tensor], torch.Tensor],
                     occ_thre: float = 0.01, ema_decay: float = 0.95, warmup_steps: int = 256,
                     generator: torch.Generator | None = None) -> None:
    """nerfacc's ``OccGridEstimator._update`` (the EMA update of the cells' occupancy and the binary
    grid), the same operations in the same order, with its random draws (the cells looked at after
    the warm-up, a point in each) made on the CPU from ``generator`` and then moved to the grid's
    device: on a CPU it gives nerfacc's numbers bit for bit when ``generator`` is seeded as torch's
    global generator would be; on CUDA the same draws as on the CPU."""
    device = estimator.occs.device
    cells = estimator.cells_per_lvl
    rand_int = lambda high, n: torch.randint(high, (n,), generator=generator).to(device)  # noqa: E731
    for lvl in range(estimator.levels):
        if step < warmup_steps:
            indices = estimator.grid_indices[estimator.occs[lvl * cells + estimator.grid_indices] >= 0.0]
        else:
            n = cells // 4
            uniform = rand_int(cells, n)
            uniform = uniform[estimator.occs[lvl * cells + uniform] >= 0.0]
            occupied = torch.nonzero(estimator.binaries[lvl].flatten())[:, 0]
            if n < len(occupied):
                occupied = occupied[rand_int(len(occupied), n)]
            indices = torch.cat([uniform, occupied], dim=0)
        grid_coords = estimator.grid_coords[indices]
        x = (grid_coords + torch.rand(grid_coords.shape, generator=generator).to(device)) / estimator.resolution
        x = estimator.aabbs[lvl, :3] + x * (estimator.aabbs[lvl, 3:] - estimator.aabbs[lvl, :3])
        occ = occ_eval_fn(x).squeeze(-1)
        cell_ids = lvl * cells + indices
        estimator.occs[cell_ids] = torch.maximum(estimator.occs[cell_ids] * ema_decay, occ)
    thre = torch.clamp(estimator.occs[estimator.occs >= 0].mean(), max=occ_thre)
    estimator.binaries = (estimator.occs > thre).view(estimator.binaries.shape)


#: the size of the views whose silhouettes decide a scene's surface level (:meth:`Renderer.surface_level`)
SILHOUETTE_SIZE = 64


def silhouette_cameras() -> Cameras:
    """The views whose silhouettes decide the surface level: 8 azimuths at 25 degrees below and
    above the horizon, and straight down and up."""
    from .cameras import VIEW_DISTANCE, VIEW_FOCAL, make_cameras

    az = torch.arange(8.0) * 45.0
    azimuths = torch.cat([az, az, torch.tensor([0.0, 0.0])])
    elevations = torch.cat([torch.full((8,), -25.0), torch.full((8,), 25.0), torch.tensor([89.0, -89.0])])
    return make_cameras(azimuths, elevations, VIEW_DISTANCE, VIEW_FOCAL)


class Renderer(torch.nn.Module):
    """Renders a :class:`GridField` with a background, skipping empty space with nerfacc's
    occupancy grid."""

    def __init__(self, field: GridField, background: Background, cfg: RenderConfig | None = None):
        super().__init__()
        cfg = cfg or RenderConfig()
        if cfg.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {cfg.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        self.cfg = cfg
        self.field = field
        self.background = background
        b = field.cfg.bound
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=[-b, -b, -b, b, b, b], resolution=cfg.occupancy_resolution, levels=1)
        self.estimator.binaries.fill_(True)  # everything is occupied until the first update
        self.step_size = 2 * math.sqrt(3) * b / cfg.samples_per_ray

    # ------------------------------------------------------------------ occupancy
    @torch.no_grad()
    def update_occupancy(self, step: int, force: bool = False, generator: torch.Generator | None = None) -> None:
        """Refresh the occupancy grid from the field (nerfacc's EMA update, :func:`occupancy_update`),
        every ``occupancy_update_every`` steps (or now when ``force``); draws from ``generator``."""
        if not force and step % self.cfg.occupancy_update_every != 0:
            return
        occupancy_update(self.estimator, step, lambda x: self.field.density(x) * self.step_size, occ_thre=self.cfg.occupancy_threshold,
                         warmup_steps=self.cfg.occupancy_warmup, generator=generator)

    def occupancy_fraction(self) -> float:
        return float(self.estimator.binaries.float().mean())

    # ------------------------------------------------------------------ rendering
    def _sampler(self, device: torch.device) -> str:
        if self.cfg.sampler == "auto":
            return "nerfacc" if cuda_sampler_available(device) else "torch"
        return self.cfg.sampler

    def render_rays(self, origins: torch.Tensor, dirs: torch.Tensor, light_pos: torch.Tensor, light_intensity: torch.Tensor,
                    ambient: torch.Tensor, mode: str = "lit", stratified: bool = False, generator: torch.Generator | None = None,
                    background: torch.Tensor | None = None) -> dict:
        """Render N rays. Lights are per ray: ``light_pos`` (N, 3), intensity and ambient (N,);
        ``background`` (N, 3): colours seen where each ray leaves the scene, in place of the
        scene's own background (None: the scene's). ``generator``: a CPU generator for the
        stratified offsets (see the module's note on random draws).

        Returns ``rgb`` (N, 3), ``opacity`` (N,), ``depth`` (N,), ``normal`` (N, 3) (composited,
        not renormalised), ``orientation`` (N,) the Ref-NeRF orientation penalty per ray, and
        ``n_samples`` the number of field evaluations."""
        if mode not in SHADING_MODES:
            raise ValueError(f"unknown shading mode {mode!r}; expected one of {', '.join(SHADING_MODES)}")
        n = origins.shape[0]
        sampler = self._sampler(origins.device)
        with record_function("render.sampling"):
            if sampler == "nerfacc":  # pragma: no cover - needs CUDA
                ray_idx, t_starts, t_ends = self._sample_nerfacc(origins, dirs, stratified, generator)
            else:
                ray_idx, t_starts, t_ends = self._sample_torch(origins, dirs, stratified, generator, dense=sampler == "dense")
            if self.cfg.early_stop_eps > 0 and t_starts.numel():
                ray_idx, t_starts, t_ends = self._drop_occluded(origins, dirs, ray_idx, t_starts, t_ends)
            pts = origins[ray_idx] + dirs[ray_idx] * ((t_starts + t_ends) * 0.5)[:, None]
        with record_function("render.field"):
            out = self.field(pts, with_normals=mode != "albedo")
        sigmas = out["density"]
        with record_function("render.shading"):
            if mode in ("lit", "textureless", "albedo"):
                normals = out.get("normals", torch.zeros_like(pts))
                colours = shade(mode, out["albedo"], normals, pts, light_pos[ray_idx], light_intensity[ray_idx], ambient[ray_idx])
            elif mode == "normals":
                colours = normals_to_rgb(out["normals"])
            else:  # depth: shaded after compositing
                colours = torch.zeros_like(pts)
        with record_function("render.compositing"):
            weights = self._weights(t_starts, t_ends, sigmas, ray_idx, n)
            def accumulate(values: torch.Tensor) -> torch.Tensor:
                out = torch.zeros(n, values.shape[-1], device=values.device, dtype=values.dtype)
                return out.index_add_(0, ray_idx, values * weights[:, None])

            opacity = torch.zeros(n, device=origins.device).index_add_(0, ray_idx, weights)
            depth = accumulate(((t_starts + t_ends) * 0.5)[:, None])[:, 0]
            rgb = accumulate(colours)
            normal = accumulate(out["normals"]) if "normals" in out else torch.zeros(n, 3, device=origins.device)
            if "normals" in out:
                facing = (out["normals"] * dirs[ray_idx]).sum(-1).clamp_min(0) ** 2
                orientation = torch.zeros(n, device=origins.device).index_add_(0, ray_idx, weights.detach() * facing)
            else:
                orientation = torch.zeros(n, device=origins.device)
        with record_function("render.background"):
            if mode == "depth":  # grey levels are assigned per image by render()
                rgb = (depth / (opacity + 1e-6))[:, None].expand(n, 3)
            else:
                behind = self.background(dirs) if background is None else background.to(rgb)
                rgb = rgb + (1 - opacity[:, None]) * behind
        return {"rgb": rgb, "opacity": opacity, "depth": depth, "normal": normal, "orientation": orientation,
                "n_samples": int(t_starts.shape[0])}

    def _sample_torch(self, origins: torch.Tensor, dirs: torch.Tensor, stratified: bool, generator: torch.Generator | None,
                      dense: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PyTorch sampler on the occupancy grid: packed (ray index, t_start, t_end) of the
        samples that lie in occupied cells (all samples inside the box when ``dense``).

        Every ray marches from where it enters the scene's box at a fixed step; only the rays that
        meet the box around the occupied cells, and only their steps that can fall inside it, are
        looked at (the same samples as a full march, found with fewer lookups)."""
        bound = self.field.cfg.bound
        near, far, hit = ray_aabb(origins, dirs, bound)
        n_steps = self.cfg.samples_per_ray + 1
        jitter = stratified_offsets(origins.shape[0], generator, origins.device) if stratified else None
        rays = None  # the rays marched, when not all of them
        if dense:
            t_starts, t_ends, valid = march(near, far, self.step_size, n_steps, jitter)
            valid &= hit[:, None]
        else:
            binaries = self.estimator.binaries[0]
            box = occupied_box(binaries, bound)
            empty = torch.zeros(0, device=origins.device)
            if box is None:
                return empty.long(), empty, empty
            box_near, box_far, box_hit = ray_box(origins, dirs, box[0].to(origins.device), box[1].to(origins.device))
            rays = (hit & box_hit).nonzero()[:, 0]  # only the rays that meet the box are marched
            if rays.numel() == 0:
                return empty.long(), empty, empty
            near, far, box_near, box_far = near[rays], far[rays], box_near[rays], box_far[rays]
            # steps whose midpoint may lie in [box_near, box_far], with a step of margin each side
            first = ((box_near - near) / self.step_size - 2).floor().clamp(0, n_steps - 1)
            last = ((box_far - near) / self.step_size + 1).ceil().clamp(0, n_steps - 1)
            count = int((last - first).max()) + 1
            t_starts, t_ends, valid = march(near, far, self.step_size, n_steps, None if jitter is None else jitter[rays],
                                            first=first, count=count)
            mids = (t_starts + t_ends) * 0.5
            o, d = origins[rays], dirs[rays]
            valid &= occupied_at(*(o[:, c, None] + d[:, c, None] * mids for c in range(3)), binaries, bound)
        i, k = valid.nonzero(as_tuple=True)
        return (i if rays is None else rays[i]), t_starts[i, k], t_ends[i, k]

    def _sample_nerfacc(self, origins: torch.Tensor, dirs: torch.Tensor, stratified: bool,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - needs CUDA
        """nerfacc's CUDA ray marching on the occupancy grid: packed (ray index, t_start, t_end).
        Each ray starts where it enters the scene's box, shifted by the same stratified offset the
        PyTorch sampler draws, and no sample is dropped here (no ``sigma_fn``: early ray termination
        is :meth:`render_rays`' own, after either sampler): the same samples as :meth:`_sample_torch`,
        up to float rounding."""
        near, far, _ = ray_aabb(origins, dirs, self.field.cfg.bound)
        if stratified:
            near = near + stratified_offsets(origins.shape[0], generator, origins.device)[:, 0] * self.step_size
        ray_idx, t_starts, t_ends = self.estimator.sampling(
            origins.contiguous(), dirs.contiguous(), t_min=near.contiguous(), t_max=far.contiguous(), render_step_size=self.step_size,
            stratified=False)
        return ray_idx.long(), t_starts, t_ends

    @staticmethod
    def _weights(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, ray_idx: torch.Tensor, n_rays: int) -> torch.Tensor:
        """Volume-rendering weights of packed samples (ray indices sorted, as both samplers give)."""
        if cuda_sampler_available(sigmas.device):  # pragma: no cover - nerfacc's packed form needs its CUDA extension
            weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas, ray_indices=ray_idx, n_rays=n_rays)
            return weights
        return packed_weights(t_starts, t_ends, sigmas, ray_idx)

    @torch.no_grad()
    def _drop_occluded(self, origins: torch.Tensor, dirs: torch.Tensor, ray_idx: torch.Tensor, t_starts: torch.Tensor,
                       t_ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Early ray termination: keep the packed samples met while the ray's transmittance is still
        at least ``early_stop_eps`` (one density lookup, no gradient). A dropped sample's weight is
        below the threshold, and so is everything it could add to the ray's colour or opacity."""
        pts = origins[ray_idx] + dirs[ray_idx] * ((t_starts + t_ends) * 0.5)[:, None]
        trans = packed_transmittance(t_starts, t_ends, self.field.density(pts), ray_idx)
        keep = (trans >= self.cfg.early_stop_eps).nonzero()[:, 0]
        return ray_idx[keep], t_starts[keep], t_ends[keep]

    @torch.no_grad()
    def opacity_and_max_density(self, cameras: Cameras, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each pixel of ``size`` x ``size`` views: the rendered opacity and the largest density
        met along its ray (every step of a dense march), each (B, size, size). A level set
        {density > L} covers exactly the pixels whose maximum exceeds L: its silhouette."""
        origins, dirs = camera_rays(cameras, size, size)
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        ray_idx, t_starts, t_ends = self._sample_torch(o, d, False, None, dense=True)
        pts = o[ray_idx] + d[ray_idx] * ((t_starts + t_ends) * 0.5)[:, None]
        sigmas = self.field.density(pts)
        n = o.shape[0]
        weights = self._weights(t_starts, t_ends, sigmas, ray_idx, n)
        opacity = torch.zeros(n, device=o.device).index_add_(0, ray_idx, weights)
        peak = torch.zeros(n, device=o.device).scatter_reduce_(0, ray_idx, sigmas, reduce="amax")
        shape = (len(cameras), size, size)
        return opacity.reshape(shape), peak.reshape(shape)

    def surface_level(self) -> float:
        """The density level of the scene's surface: the one whose silhouettes match its renders
        from :func:`silhouette_cameras` (:func:`dreamfusion.export.silhouette_level`): the export's,
        and where a run's grid becomes a signed distance."""
        from .export import silhouette_level

        cams = silhouette_cameras().to(self.field.density_grid.device)
        opacity, peak = self.opacity_and_max_density(cams, SILHOUETTE_SIZE)
        return silhouette_level(opacity.cpu(), peak.cpu())

    def render(self, cameras: Cameras, lights: Lights, height: int, width: int, mode: str = "lit", stratified: bool = False,
               generator: torch.Generator | None = None, background: torch.Tensor | None = None) -> dict:
        """Render images. Returns ``image`` (B, 3, H, W), ``opacity`` (B, 1, H, W), ``depth`` and
        the per-ray ``orientation`` penalty (B, H, W), plus ``n_samples``. ``background`` (B, 3):
        a solid colour behind each image in place of the scene's own background (None: the scene's)."""
        origins, dirs = camera_rays(cameras, height, width)
        b = len(cameras)
        per_ray = lambda v: v[:, None].expand(b, height * width, *v.shape[1:]).reshape(b * height * width, *v.shape[1:])  # noqa: E731
        out = self.render_rays(origins.reshape(-1, 3), dirs.reshape(-1, 3), per_ray(lights.position), per_ray(lights.intensity),
                               per_ray(lights.ambient), mode, stratified, generator, None if background is None else per_ray(background))
        img = lambda v, c: v.reshape(b, height, width, c).permute(0, 3, 1, 2)  # noqa: E731
        image = img(out["rgb"], 3)
        if mode == "depth":
            image = depth_image(image[:, 0], img(out["opacity"][:, None], 1)[:, 0])
        return {
            "image": image,
            "opacity": img(out["opacity"][:, None], 1),
            "depth": out["depth"].reshape(b, height, width),
            "normal": img(out["normal"], 3),
            "orientation": out["orientation"].reshape(b, height, width),
            "n_samples": out["n_samples"],
        }
