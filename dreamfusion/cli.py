"""The ``dreamfusion`` command line: generate, batch, export, render, app, train-prior.

Options come from typed dataclasses (tyro), so ``--help`` documents every one. Only the torch-free
:mod:`dreamfusion.config` is imported before a command runs, so help is instant. Bad input ends
with one ``error:`` line on stderr and exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from .config import ExportOptions, TrainConfig, TrainPriorConfig, with_settings

DEFAULT_PROMPT = "a red cube"


@dataclass
class RunOptions:
    """The settings of a run, shared by ``generate`` and ``batch``."""

    steps: int | None = None
    """iterations (default: --advanced.steps)"""
    seed: int | None = None
    """(default: --advanced.seed)"""
    guidance: str | None = None
    """prior: embedded or stable-diffusion (default: --advanced.guidance.name)"""
    model: str | None = None
    """stable-diffusion: local folder or hub id; embedded: another prior folder"""
    cfg: float | None = None
    """classifier-free guidance weight (default: the prior's own: 10 embedded, 100 stable-diffusion)"""
    resolution: int | None = None
    """training render size in pixels (default: --advanced.render-size)"""
    device: str | None = None
    """cpu or cuda (default: --advanced.device)"""
    threads: int = 0
    """CPU threads for torch (0: torch's default)"""
    quiet: bool = False
    """no progress bar"""
    export: ExportOptions = field(default_factory=ExportOptions)
    advanced: TrainConfig = field(default_factory=TrainConfig)
    """every setting of the run (an option above, when given, takes precedence)"""


@dataclass
class Generate(RunOptions):
    """Make a 3D object from a text prompt and write DIR/mesh.glb, mesh.obj, mesh.ply,
    turntable.mp4, checkpoint.safetensors, config.json, log.jsonl and preview.png."""

    prompt: Annotated[str, tyro.conf.Positional] = DEFAULT_PROMPT
    out: Path = Path("outputs/run")
    """output folder (must not exist or be empty unless --overwrite)"""
    overwrite: bool = False
    """replace the output folder (only once the new run has been written)"""


@dataclass
class Batch(RunOptions):
    """Make a 3D object for every prompt of a list, on Ray (this machine, or a cluster with --address),
    into DIR/<prompt>/ as generate does; a rerun skips finished prompts. Writes DIR/summary.csv,
    summary.json and contact_sheet.png; the exit status is the number of failed prompts. Needs
    pip install -e ".[cluster]"; see docs/batch.md."""

    prompts: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="PROMPTS")] = tyro.MISSING
    """a text file, one prompt a line (blank lines and # comments skipped), or a .csv/.tsv: prompt[,seed]"""
    out: Path = Path("outputs/batch")
    """batch folder: DIR/<prompt>/ per prompt, batch.json, the summary and the contact sheet"""
    overwrite: bool = False
    """start over: clear DIR even if it holds another batch (without it, a rerun resumes)"""
    address: str | None = None
    """Ray cluster to join: auto (started here with ray start --head), host:port or ray://host:port (default: Ray on this machine)"""
    cpus_per_run: float = 1.0
    """CPUs each run asks for (also its torch threads unless --threads)"""
    gpus_per_run: float = 0.0
    """GPUs each run asks for (fractions share one); runs then default to --device cuda"""
    max_parallel: int = 0
    """runs at once (0: as many as the cluster's resources fit)"""


@dataclass
class Export:
    """Re-export the scene of a checkpoint as meshes and a turntable (no prior is loaded)."""

    checkpoint: Annotated[Path, tyro.conf.Positional]
    out: Path = Path("outputs/export")
    overwrite: bool = False
    export: ExportOptions = field(default_factory=ExportOptions)


@dataclass
class Render:
    """Render a checkpoint's scene to an image (.png) or a turntable (.mp4/.gif), with any shading
    and light (no prior is loaded)."""

    checkpoint: Annotated[Path, tyro.conf.Positional]
    out: Path = Path("render.png")
    overwrite: bool = False
    mode: str = "lit"
    """lit, textureless, albedo, normals or depth"""
    size: int = 256
    azimuth: float = 30.0
    elevation: float = 20.0
    distance: float = 1.9
    light_azimuth: float | None = None
    """light direction (default: at the camera)"""
    light_elevation: float = 30.0
    light_intensity: float = 0.75
    ambient: float = 0.2
    frames: int = 36


@dataclass
class App:
    """Start the web page and the live 3D viewer (the same as ``python -m app``)."""

    host: str = "127.0.0.1"
    """address both servers bind (0.0.0.0 exposes them; GRADIO_SERVER_NAME sets the default)"""
    port: int = 7860
    viewer_port: int = 8080
    no_viewer: bool = False
    runs_dir: str = "runs/app"
    max_concurrent: int = 1
    max_runs_kept: int = 20
    threads: int = 1
    device: str | None = None


def train_config(args: RunOptions) -> TrainConfig:
    """``--advanced`` with the top-level options that were given (a setting left out keeps the
    ``--advanced`` value, whether default or set by the user)."""
    return with_settings(args.advanced, steps=args.steps, seed=args.seed, guidance=args.guidance, model=args.model,
                         guidance_scale=args.cfg, render_size=args.resolution, device=args.device)


def run_generate(args: Generate) -> Path:
    """``dreamfusion generate``: train, then write the run folder through a staging folder."""
    import torch

    from .runs import staged_output, validate_export, write_run
    from .trainer import Trainer, validate_config, validate_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = validate_prompt(args.prompt)
    cfg = train_config(args)
    validate_config(cfg)
    validate_export(args.export)
    with staged_output(args.out, args.overwrite) as staging:
        messages: list[str] = []
        trainer = Trainer(cfg, prompt, on_message=lambda m: (messages.append(m), print(f"note: {m}", file=sys.stderr)))
        unknown = trainer.guidance.vocabulary_note(prompt)
        if unknown:
            trainer.on_message(unknown)
        start = time.perf_counter()
        if args.quiet:
            trainer.run()
        else:
            from tqdm import tqdm

            with tqdm(total=trainer.total_steps, desc=prompt[:40], unit="it", dynamic_ncols=True) as bar:
                trainer.callbacks.append(lambda m: (bar.update(1), bar.set_postfix(loss=f"{m['loss']:.3g}", occ=f"{m['occupancy']:.2f}")))
                trainer.run()
        seconds = time.perf_counter() - start
        timing = {"seconds": seconds, "iterations": trainer.step_count, "it_per_s": trainer.step_count / max(seconds, 1e-9), "notes": messages}
        write_run(trainer, staging, args.export, timing)
    print(f"wrote {args.out} ({trainer.step_count} iterations in {seconds:.0f} s, {timing['it_per_s']:.1f} it/s)")
    return args.out


def run_export(args: Export) -> Path:
    from .checkpoint import load_scene, read_checkpoint
    from .runs import export_renderer, staged_output, validate_export

    # every check that can fail on bad input comes before anything is created
    validate_export(args.export)
    read_checkpoint(args.checkpoint)
    with staged_output(args.out, args.overwrite) as staging:
        scene, _, _ = load_scene(args.checkpoint)
        for note in export_renderer(scene, staging, args.export):
            print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}")
    return args.out


def run_render(args: Render) -> Path:
    import imageio.v3 as iio
    import torch

    from .cameras import VIEW_FOCAL, Cameras, Lights, make_cameras, spherical_to_position
    from .checkpoint import load_scene
    from .export import save_turntable, to_uint8
    from .shading import SHADING_MODES

    if args.mode not in SHADING_MODES:
        raise ValueError(f"unknown shading mode {args.mode!r}; valid modes: {', '.join(SHADING_MODES)}")
    if not 16 <= args.size <= 1024:
        raise ValueError(f"size must be between 16 and 1024 pixels, got {args.size}")
    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".mp4", ".gif"):
        raise ValueError(f"output must end in .png, .mp4 or .gif, got {args.out.name!r}")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")
    scene, _, _ = load_scene(args.checkpoint)

    def lights_for(cams: Cameras) -> Lights:
        n = len(cams)
        if args.light_azimuth is None:
            pos = cams.position.clone()
        else:
            pos = spherical_to_position(torch.tensor([args.light_azimuth]), torch.tensor([args.light_elevation]), torch.tensor([3.0])).expand(n, 3)
        return Lights(pos, torch.full((n,), args.light_intensity), torch.full((n,), args.ambient))

    def render(cams: Cameras) -> torch.Tensor:
        with torch.no_grad():
            return scene.render(cams, lights_for(cams), args.size, args.size, args.mode)["image"].clamp(0, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        img = render(make_cameras(args.azimuth, args.elevation, args.distance, VIEW_FOCAL))[0]
        tmp = args.out.with_name(args.out.name + ".tmp.png")
        iio.imwrite(tmp, to_uint8(img))
        tmp.replace(args.out)
    else:
        save_turntable(render, args.out, frames=args.frames, size=args.size)
    print(f"wrote {args.out}")
    return args.out


def run_app(args: App) -> None:
    from app.__main__ import main as app_main

    argv = ["--host", args.host, "--port", str(args.port), "--viewer-port", str(args.viewer_port), "--runs-dir", args.runs_dir,
            "--max-concurrent", str(args.max_concurrent), "--max-runs-kept", str(args.max_runs_kept), "--threads", str(args.threads)]
    argv += ["--no-viewer"] if args.no_viewer else []
    argv += ["--device", args.device] if args.device else []
    app_main(argv)


def run_batch(args: Batch) -> int:
    """``dreamfusion batch``: the exit status is the number of failed prompts (130: interrupted)."""
    from dataclasses import fields

    from .batch import ClusterOptions, import_ray, read_prompts, report
    from .batch import run_batch as run_prompts

    import_ray("dreamfusion batch")  # without the extra, say how to install it before anything else
    prompts = read_prompts(args.prompts)
    template = Generate(**{f.name: getattr(args, f.name) for f in fields(RunOptions)})
    cluster = ClusterOptions(address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                             max_parallel=args.max_parallel)
    result = run_prompts(prompts, args.out, template, cluster, overwrite=args.overwrite, prompt_file=args.prompts, quiet=args.quiet)
    print(report(result, args.out))
    return result.exit_status


def run_train_prior(cfg: TrainPriorConfig) -> Path:
    from .prior.train import train_prior

    return train_prior(cfg)


COMMANDS = {"generate": (Generate, run_generate), "batch": (Batch, run_batch), "export": (Export, run_export),
            "render": (Render, run_render), "app": (App, run_app), "train-prior": (TrainPriorConfig, run_train_prior)}


def quiet_libraries() -> None:
    """Model-loading progress bars of transformers/diffusers would bury our own output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}, args=argv, prog="dreamfusion")
    handler = next(fn for cls, fn in COMMANDS.values() if type(args) is cls)
    from .checkpoint import CheckpointError
    from .guidance import GuidanceError

    if handler is not run_batch:  # a batch loads no model here: its workers quiet their own
        quiet_libraries()
    try:
        status = handler(args)
    except (ValueError, GuidanceError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = "finished runs are kept in the batch folder" if handler is run_batch else "nothing was written to the output folder"
        print(f"error: interrupted; {kept}", file=sys.stderr)
        return 130
    return status if type(status) is int else 0  # a command that counts failures (batch) says how many


if __name__ == "__main__":
    sys.exit(main())
