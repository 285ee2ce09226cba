"""A run's output folder: everything a finished (or stopped) run writes, in one place.

Files are written into ``DIR.partial`` and the folder is moved into place at the end, so an
interrupted run never leaves a half-written ``DIR`` and never mixes with an earlier run there.
A run that stops early keeps ``DIR.partial`` if it holds the run's checkpoint (the state it can
resume from); any other staging folder is removed. One process at a time writes ``DIR``
(:func:`dreamfusion.files.folder_lock`). Importing this module imports no torch: the command line
checks an output folder before anything heavy is loaded.
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

from .checkpoint import CHECKPOINT_FILE
from .config import MESH_FORMATS, VIDEO_FORMATS, ExportOptions, config_to_dict, validate_export  # noqa: F401 - the app imports them from here
from .files import folder_lock, staging_folder

if TYPE_CHECKING:
    import torch
    import trimesh

    from .cameras import Cameras
    from .render import Renderer
    from .trainer import Trainer


def stopped_checkpoint(out: Path) -> Path | None:
    """The checkpoint a stopped run into ``out`` left in its staging folder, if any."""
    path = staging_folder(out) / CHECKPOINT_FILE
    return path if path.is_file() else None


def check_output(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse an output folder that would lose something: a file in its place, a folder with
    another run (unless ``overwrite``), or the checkpoint of a stopped run into it (unless
    ``resume`` continues it or ``overwrite`` starts over). Touches nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} already exists and is not empty; choose another --out or pass --overwrite")
    stopped = stopped_checkpoint(out)
    if stopped is not None and not resume and not overwrite:
        raise ValueError(f"{staging_folder(out)} holds a stopped run into {out}: continue it with --resume {out}, "
                         "or pass --overwrite to start over")


def prepare_output(out: Path, overwrite: bool, resume: bool = False) -> Path:
    """Check the target folder (:func:`check_output`) and return the staging folder to write into:
    kept as it is when ``resume`` continues the stopped run in it, else made empty."""
    check_output(out, overwrite, resume)
    staging = staging_folder(out)
    if resume and stopped_checkpoint(out) is not None:
        return staging
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
def staged_output(out: Path, overwrite: bool, resume: bool = False) -> Iterator[Path]:
    """Write a run into a staging folder, moved into place only if the block succeeds, while
    holding ``out``'s lock. On any failure (or Ctrl-C) ``out`` is untouched and the staging
    folder is removed, unless it holds the run's checkpoint: then it stays, to be resumed."""
    with folder_lock(out):
        staging = prepare_output(out, overwrite, resume)
        try:
            yield staging
        except BaseException:
            if not (staging / CHECKPOINT_FILE).is_file():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finish_output(staging, out)


#: the UV-textured GLB's name in a run folder (``--export.texture``)
TEXTURED_GLB = "mesh_textured.glb"

def smoothed_scene(scene: Renderer, sigma: float) -> Renderer:
    """A copy of ``scene`` whose raw density grid is blurred with a Gaussian of ``sigma`` voxels
    (:func:`dreamfusion.field.gaussian_blur_3d`); its albedo, and ``scene`` itself, are untouched."""
    import copy

    import torch

    from .field import gaussian_blur_3d

    smooth = copy.deepcopy(scene)
    with torch.no_grad():
        smooth.field.density_grid.copy_(gaussian_blur_3d(scene.field.density_grid, sigma))
    return smooth


def scene_mesh(scene: Renderer, opts: ExportOptions) -> tuple[trimesh.Trimesh, list[str]]:
    """The mesh ``opts`` ask for of a scene (a :class:`~dreamfusion.render.Renderer`): its surface
    level, marching cubes and the asset steps, in world coordinates (+Z up) with vertex colours.
    Returns the mesh and the notes for the user (such as a surface level lowered for a faint scene,
    or what decimation cost)."""
    from .export import ExportWarning, extract_mesh

    device = scene.field.density_grid.device
    if opts.field_smoothing > 0:  # the surface, its level and its colours all come from the smoothed field
        scene = smoothed_scene(scene, opts.field_smoothing)
    threshold = opts.threshold
    if threshold is None and opts.level == "silhouette":
        threshold = scene.surface_level()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = extract_mesh(scene.field.density, scene.field.albedo, resolution=opts.mesh_resolution,
                            bound=scene.field.cfg.bound, threshold=threshold, device=device, fill_voids=opts.fill_voids,
                            colour_depth=opts.colour_depth * 2 * scene.field.cfg.bound / (scene.field.resolution - 1),
                            refine_steps=opts.refine_steps, surface_smoothing=opts.surface_smoothing, max_faces=opts.faces,
                            colour_smoothing=opts.colour_smoothing, colour_edge=opts.colour_edge)
    notes = [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]
    d = mesh.metadata.get("decimation")
    if d is not None and d["faces"] < d["faces_before"]:  # a mesh within the budget is left as it is: nothing to report
        notes.append(f"decimated to {d['faces']:,} faces from {d['faces_before']:,}: the surface moved {d['mean_distance']:.4f} "
                     f"on average and {d['max_distance']:.4f} at most (world units)")
    return mesh, notes


def write_export(scene: Renderer, mesh: trimesh.Trimesh, folder: Path, opts: ExportOptions) -> None:
    """The files of an export into ``folder``: ``mesh`` in each of ``opts.formats``, the textured
    GLB when asked for, and the scene's turntable unless ``opts.video`` is none."""
    import torch

    from .cameras import default_light
    from .export import save_mesh, save_textured_glb, save_turntable

    folder = Path(folder)
    for fmt in opts.formats:
        save_mesh(mesh, folder / f"mesh.{fmt}")
    if opts.texture:
        save_textured_glb(mesh, folder / TEXTURED_GLB, texture_size=opts.texture_size)
    if opts.video != "none":
        device = scene.field.density_grid.device

        def render(cams: Cameras) -> torch.Tensor:
            with torch.no_grad():
                return scene.render(cams.to(device), default_light(cams).to(device), opts.video_size, opts.video_size,
                                    opts.video_mode)["image"].clamp(0, 1).cpu()

        save_turntable(render, folder / f"turntable.{opts.video}", frames=opts.video_frames, size=opts.video_size)


def export_renderer(scene: Renderer, folder: Path, opts: ExportOptions) -> list[str]:
    """Write meshes and the turntable of a scene (a :class:`~dreamfusion.render.Renderer`, e.g. a
    snapshot or :func:`~dreamfusion.checkpoint.load_scene`'s) into ``folder``: :func:`scene_mesh`,
    then :func:`write_export`. Returns the notes for the user."""
    mesh, notes = scene_mesh(scene, opts)
    write_export(scene, mesh, folder, opts)
    return notes


def export_scene(trainer: Trainer, folder: Path, opts: ExportOptions) -> dict[str, Path]:
    """Write meshes and the turntable of the trainer's current scene into ``folder``: both from
    one snapshot, taken at once, so training may go on meanwhile."""
    folder = Path(folder)
    scene = trainer.snapshot()  # one consistent state, even while training goes on
    for note in export_renderer(scene, folder, opts):
        trainer.on_message(note)
    return exported_files(folder, opts)


def exported_files(folder: Path, opts: ExportOptions) -> dict[str, Path]:
    """The files :func:`write_export` writes into ``folder``, by kind: each mesh format's name
    (``glb``, ``obj``, ``ply``), ``textured_glb`` and ``video``."""
    folder = Path(folder)
    written = {fmt: folder / f"mesh.{fmt}" for fmt in opts.formats}
    if opts.texture:
        written["textured_glb"] = folder / TEXTURED_GLB
    if opts.video != "none":
        written["video"] = folder / f"turntable.{opts.video}"
    return written


def write_config(trainer: Trainer, folder: Path, opts: ExportOptions) -> Path:
    """``config.json``: the run's prompt, its training settings (the prior's defaults filled in) and
    its export options, as data."""
    path = Path(folder) / "config.json"
    path.write_text(json.dumps({"prompt": trainer.prompt, "train": config_to_dict(trainer.cfg), "export": asdict(opts)}, indent=2, default=str))
    return path


def write_run(trainer: Trainer, folder: Path, opts: ExportOptions, timing: dict | None = None) -> dict[str, Path]:
    """Everything a run leaves behind: checkpoint, config, log, meshes, turntable and preview.
    The one writer of a run folder, for the command line and the app alike. The checkpoint comes
    first: an export that fails (a full disk) leaves the state to resume from."""
    import imageio.v3 as iio

    from .export import to_uint8

    folder = Path(folder)
    checkpoint = trainer.save_checkpoint(folder / CHECKPOINT_FILE)
    config = write_config(trainer, folder, opts)
    log = folder / "log.jsonl"
    with open(log, "w") as f:
        for row in trainer.history:
            f.write(json.dumps(row) + "\n")
        if timing:
            f.write(json.dumps({"summary": timing}) + "\n")
    written = export_scene(trainer, folder, opts)
    written.update(checkpoint=checkpoint, config=config, log=log, preview=folder / "preview.png")
    iio.imwrite(written["preview"], to_uint8(trainer.preview(size=128)))
    return written
