"""A run's output folder: everything a finished (or stopped) run writes, in one place.

Files are written into ``DIR.partial`` and the folder is moved into place at the end, so an
interrupted run never leaves a half-written ``DIR`` and never mixes with an earlier run there.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .cameras import default_light
from .config import MESH_FORMATS, VIDEO_FORMATS, ExportOptions
from .export import ExportWarning, extract_mesh, save_mesh, save_turntable, silhouette_level, to_uint8
from .trainer import Trainer, config_to_dict

if TYPE_CHECKING:
    import torch

    from .cameras import Cameras
    from .render import Renderer


def validate_export(opts: ExportOptions) -> None:
    if opts.fill_voids not in ("none", "enclosed", "axes"):
        raise ValueError(f"unknown void filling {opts.fill_voids!r}; use none, enclosed or axes")
    if opts.level not in ("silhouette", "fixed"):
        raise ValueError(f"unknown surface level rule {opts.level!r}; use silhouette or fixed")
    if opts.threshold is not None and not opts.threshold > 0:
        raise ValueError(f"the surface threshold must be a positive density, got {opts.threshold}")
    bad = [f for f in opts.formats if f not in MESH_FORMATS]
    if bad:
        raise ValueError(f"unknown mesh format {bad[0]!r}; valid formats: {', '.join(MESH_FORMATS)}")
    if opts.video not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {opts.video!r}; valid formats: {', '.join(VIDEO_FORMATS)}")
    if not 16 <= opts.mesh_resolution <= 512:
        raise ValueError(f"mesh resolution must be between 16 and 512, got {opts.mesh_resolution}")
    if not 16 <= opts.video_size <= 1024 or opts.video_frames <= 0:
        raise ValueError("turntable size must be 16..1024 pixels and frames positive")


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Check the target folder and return the staging folder to write into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} already exists and is not empty; choose another --out or pass --overwrite")
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finish_output(staging: Path, out: Path) -> Path:
    """Move the staged folder into place (replacing an old run only now, when all is written)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Write a run into a staging folder, moved into place only if the block succeeds; on any
    failure (or Ctrl-C) the staging folder is removed and ``out`` is untouched."""
    staging = prepare_output(out, overwrite)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_output(staging, out)


#: the views whose silhouettes decide the surface level: 8 azimuths at 25 degrees below and above
#: the horizon, and straight down and up
SILHOUETTE_SIZE = 64


def silhouette_cameras() -> Cameras:
    import torch

    from .cameras import VIEW_DISTANCE, VIEW_FOCAL, make_cameras

    az = torch.arange(8.0) * 45.0
    azimuths = torch.cat([az, az, torch.tensor([0.0, 0.0])])
    elevations = torch.cat([torch.full((8,), -25.0), torch.full((8,), 25.0), torch.tensor([89.0, -89.0])])
    return make_cameras(azimuths, elevations, VIEW_DISTANCE, VIEW_FOCAL)


def surface_level(scene: Renderer) -> float:
    """The density level of a scene's surface: the one whose silhouettes match its renders
    (:func:`dreamfusion.export.silhouette_level`)."""
    cams = silhouette_cameras().to(scene.field.density_grid.device)
    opacity, peak = scene.opacity_and_max_density(cams, SILHOUETTE_SIZE)
    return silhouette_level(opacity.cpu(), peak.cpu())


def export_renderer(scene: Renderer, folder: Path, opts: ExportOptions) -> list[str]:
    """Write meshes and the turntable of a scene (a :class:`~dreamfusion.render.Renderer`, e.g. a
    snapshot or :func:`~dreamfusion.checkpoint.load_scene`'s) into ``folder``. Returns the notes
    for the user (such as a surface level lowered for a faint scene)."""
    import torch

    folder = Path(folder)
    device = scene.field.density_grid.device
    threshold = opts.threshold
    if threshold is None and opts.level == "silhouette":
        threshold = surface_level(scene)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = extract_mesh(scene.field.density, scene.field.albedo, resolution=opts.mesh_resolution,
                            bound=scene.field.cfg.bound, threshold=threshold, device=device, fill_voids=opts.fill_voids,
                            colour_depth=opts.colour_depth * 2 * scene.field.cfg.bound / (scene.field.resolution - 1))
    for fmt in opts.formats:
        save_mesh(mesh, folder / f"mesh.{fmt}")
    if opts.video != "none":
        def render(cams: Cameras) -> torch.Tensor:
            with torch.no_grad():
                return scene.render(cams.to(device), default_light(cams).to(device), opts.video_size, opts.video_size,
                                    opts.video_mode)["image"].clamp(0, 1).cpu()

        save_turntable(render, folder / f"turntable.{opts.video}", frames=opts.video_frames, size=opts.video_size)
    return [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]


def export_scene(trainer: Trainer, folder: Path, opts: ExportOptions) -> dict[str, Path]:
    """Write meshes and the turntable of the trainer's current scene into ``folder``: both from
    one snapshot, taken at once, so training may go on meanwhile."""
    folder = Path(folder)
    scene = trainer.snapshot()  # one consistent state, even while training goes on
    for note in export_renderer(scene, folder, opts):
        trainer.on_message(note)
    written = {fmt: folder / f"mesh.{fmt}" for fmt in opts.formats}
    if opts.video != "none":
        written["video"] = folder / f"turntable.{opts.video}"
    return written


def write_run(trainer: Trainer, folder: Path, opts: ExportOptions, timing: dict | None = None) -> dict[str, Path]:
    """Everything a run leaves behind: meshes, turntable, checkpoint, config, log and preview.
    The one writer of a run folder, for the command line and the app alike."""
    import imageio.v3 as iio

    folder = Path(folder)
    written = export_scene(trainer, folder, opts)
    written["checkpoint"] = trainer.save_checkpoint(folder / "checkpoint.safetensors")
    written["config"] = folder / "config.json"
    written["config"].write_text(json.dumps({"prompt": trainer.prompt, "train": config_to_dict(trainer.cfg), "export": asdict(opts)},
                                            indent=2, default=str))
    written["log"] = folder / "log.jsonl"
    with open(written["log"], "w") as f:
        for row in trainer.history:
            f.write(json.dumps(row) + "\n")
        if timing:
            f.write(json.dumps({"summary": timing}) + "\n")
    written["preview"] = folder / "preview.png"
    iio.imwrite(written["preview"], to_uint8(trainer.preview(size=128)))
    return written
