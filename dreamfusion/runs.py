"""A run's output folder: everything a finished (or stopped) run writes, in one place.

Files are written into ``DIR.partial`` and the folder is moved into place at the end, so an
interrupted run never leaves a half-written ``DIR`` and never mixes with an earlier run there.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .export import extract_mesh, save_mesh, save_turntable
from .trainer import Trainer, config_to_dict

MESH_FORMATS = ("glb", "obj", "ply")
VIDEO_FORMATS = ("mp4", "gif", "none")


@dataclass
class ExportOptions:
    """What to write at the end of a run."""

    formats: tuple[str, ...] = MESH_FORMATS
    """mesh formats to write (glb, obj, ply)"""
    mesh_resolution: int = 128
    """marching-cubes grid per side"""
    threshold: float | None = None
    """density level of the surface (default: chosen from the density, see export.extract_mesh)"""
    video: str = "mp4"
    """turntable format: mp4, gif or none"""
    video_mode: str = "lit"
    """shading of the turntable: lit, textureless, albedo, normals, depth"""
    video_frames: int = 36
    video_size: int = 128


def validate_export(opts: ExportOptions) -> None:
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
def staged_output(out: Path, overwrite: bool):
    """Write a run into a staging folder, moved into place only if the block succeeds; on any
    failure (or Ctrl-C) the staging folder is removed and ``out`` is untouched."""
    staging = prepare_output(out, overwrite)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_output(staging, out)


def export_scene(trainer: Trainer, folder: Path, opts: ExportOptions) -> dict[str, Path]:
    """Write meshes and the turntable of the trainer's current scene into ``folder``: both from
    one snapshot, taken at once, so training may go on meanwhile."""
    folder = Path(folder)
    written: dict[str, Path] = {}
    scene = trainer.snapshot()  # one consistent state, even while training goes on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = extract_mesh(scene.field.density, scene.field.albedo, resolution=opts.mesh_resolution,
                            bound=trainer.cfg.field.bound, threshold=opts.threshold, device=trainer.device)
    for w in caught:  # e.g. a surface level lowered for a faint scene: a note for the user, not a traceback
        trainer.on_message(str(w.message))
    for fmt in opts.formats:
        written[fmt] = folder / f"mesh.{fmt}"
        save_mesh(mesh, written[fmt])
    if opts.video != "none":
        written["video"] = folder / f"turntable.{opts.video}"
        save_turntable(lambda cams: trainer.render_views(cams, size=opts.video_size, mode=opts.video_mode, scene=scene), written["video"],
                       frames=opts.video_frames, size=opts.video_size)
    return written


def write_run(trainer: Trainer, folder: Path, opts: ExportOptions, timing: dict | None = None) -> dict[str, Path]:
    """Everything a run leaves behind: meshes, turntable, checkpoint, config, log and preview."""
    import imageio.v3 as iio

    folder = Path(folder)
    written = export_scene(trainer, folder, opts)
    written["checkpoint"] = trainer.save_checkpoint(folder / "checkpoint.safetensors")
    written["config"] = folder / "config.json"
    written["config"].write_text(json.dumps({"prompt": trainer.prompt, "train": config_to_dict(trainer.cfg), "export": opts.__dict__},
                                            indent=2, default=str))
    written["log"] = folder / "log.jsonl"
    with open(written["log"], "w") as f:
        for row in trainer.history:
            f.write(json.dumps(row) + "\n")
        if timing:
            f.write(json.dumps({"summary": timing}) + "\n")
    preview = trainer.preview(size=128)
    written["preview"] = folder / "preview.png"
    iio.imwrite(written["preview"], (preview.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    return written

