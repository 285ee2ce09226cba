"""The ``dreamfusion`` command line: generate, batch, export, render, app, train-prior.

Options come from typed dataclasses (tyro), so ``--help`` documents every one. Only torch-free
modules are imported before a command has checked its input, so help is instant and bad input
is refused at once: one ``error:`` line on stderr and exit status 2 (1 for a file-system error
such as a full disk), nothing already written touched, never a traceback. Ctrl-C and SIGTERM
stop a run after its current step and keep its checkpoint, and say where.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import tyro

from .config import GUIDANCES, PRESETS, USER_GUIDANCES, ExportOptions, TrainConfig, TrainPriorConfig, apply_preset, with_settings
from .pipeline import DEFAULT_CHECKPOINT_EVERY, Interrupted

DEFAULT_PROMPT = "a red cube"
DEFAULT_OUT = Path("outputs/run")
#: the weights each prior uses unless told otherwise, for --help (from the registry, so never stale)
GUIDANCE_DEFAULTS = ", ".join(f"{GUIDANCES[name].guidance_scale:g} {name}" for name in USER_GUIDANCES)


@dataclass
class RunOptions:
    """The settings of a run, shared by ``generate`` and ``batch``."""

    preset: Annotated[str, tyro.conf.arg(help=f"a named trade of time against quality: {', '.join(PRESETS)} (docs/speed.md); "
                                              "applied to --advanced's defaults, then the options below")] = "default"
    steps: int | None = None
    """iterations (default: the preset's, else --advanced.steps)"""
    seed: int | None = None
    """0 to 2^63 - 1: the same seed and settings give the same object, bit for bit (default: --advanced.seed)"""
    guidance: Annotated[str | None, tyro.conf.arg(help=f"prior: {' or '.join(USER_GUIDANCES)} (default: --advanced.guidance.name)")] = None
    model: str | None = None
    """stable-diffusion, deepfloyd-if: a local folder or a hub id; embedded: another prior folder"""
    cfg: Annotated[float | None, tyro.conf.arg(help=f"classifier-free guidance weight (default: the prior's own: {GUIDANCE_DEFAULTS})")] = None
    resolution: int | None = None
    """training render size in pixels (default: --advanced.render-size)"""
    device: str | None = None
    """cpu or cuda (default: --advanced.device)"""
    threads: int = 0
    """CPU threads for torch (0: torch's default)"""
    quiet: bool = False
    """no progress bar"""
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    """write the run's checkpoint (atomically) every this many steps while it trains, so a run that is
    killed outright loses at most these steps (0: only when stopped)"""
    export: ExportOptions = field(default_factory=ExportOptions)
    advanced: TrainConfig = field(default_factory=TrainConfig)
    """every setting of the run (an option above, when given, takes precedence)"""


@dataclass
class Generate(RunOptions):
    """Make a 3D object from a text prompt and write DIR/mesh.glb, mesh.obj, mesh.ply,
    turntable.mp4, checkpoint.safetensors, config.json, log.jsonl and preview.png. The run is
    written in DIR.partial and moved to DIR when whole; Ctrl-C (or SIGTERM) stops it after the
    current step with its checkpoint kept there, and --resume DIR continues it."""

    prompt: Annotated[str, tyro.conf.Positional] = DEFAULT_PROMPT
    out: Path | None = None
    """output folder: must not exist or be empty unless --overwrite (default: outputs/run; with
    --resume, the resumed run's)"""
    overwrite: bool = False
    """replace the output folder (only once the new run has been written), or start over where a
    stopped run's checkpoint waits"""
    resume: Path | None = None
    """continue a stopped run to its step count: its folder (the --out it was given) or its
    checkpoint; a finished run continues into a new --out when --steps is above its own. The run
    keeps its prompt and settings: only --steps, --device, --threads, --quiet, --checkpoint-every,
    --out and --export.* may be given with it"""


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
    """Re-export the scene of a run as meshes and a turntable (no prior is loaded)."""

    checkpoint: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """a run folder or a checkpoint file"""
    out: Path = Path("outputs/export")
    overwrite: bool = False
    export: ExportOptions = field(default_factory=ExportOptions)


@dataclass
class Render:
    """Render the scene of a run to an image (.png) or a turntable (.mp4/.gif), with any shading
    and light (no prior is loaded)."""

    checkpoint: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """a run folder or a checkpoint file"""
    out: Path = Path("render.png")
    overwrite: bool = False
    mode: str = "lit"
    """lit, textureless, albedo, normals or depth"""
    size: int = 256
    """pixels per side, 16 to 1024"""
    azimuth: float = 30.0
    elevation: float = 20.0
    distance: float = 1.9
    light_azimuth: float | None = None
    """light direction (default: at the camera)"""
    light_elevation: float = 30.0
    light_intensity: float = 0.75
    ambient: float = 0.2
    frames: int = 36
    """turntable frames, 1 to 360 (and frames x size^2 at most 360 x 512^2)"""


@dataclass
class App:
    """Start the web page and the live 3D viewer: python -m app with the arguments that follow
    (dreamfusion app --help lists them)."""


class CommandStopped(Exception):
    """A command that ended early: its one line for the user and its exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- generate


def train_config(args: RunOptions) -> TrainConfig:
    """``--advanced`` with the top-level options that were given (a setting left out keeps the
    ``--advanced`` value, whether default or set by the user)."""
    return with_settings(apply_preset(args.advanced, args.preset), steps=args.steps, seed=args.seed, guidance=args.guidance, model=args.model,
                         guidance_scale=args.cfg, render_size=args.resolution, device=args.device)


def check_run_options(args: RunOptions) -> None:
    if args.threads < 0:
        raise ValueError(f"threads must be 0 (torch's default) or more, got {args.threads}")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be 0 (only when stopped) or more steps, got {args.checkpoint_every}")


@dataclass(frozen=True)
class GeneratePlan:
    """What ``generate`` will do, decided (and every input checked) before anything is loaded."""

    prompt: str
    cfg: TrainConfig
    export: ExportOptions
    out: Path
    overwrite: bool
    resume_from: Path | None = None


def resume_target(path: Path) -> tuple[Path, Path]:
    """(the run's folder DIR, the checkpoint to continue) for ``--resume PATH``: a run folder (a
    stopped run's checkpoint in DIR.partial first, else a finished run's), its staging folder, or
    a checkpoint file."""
    from .checkpoint import CHECKPOINT_FILE
    from .files import staging_folder
    from .runs import stopped_checkpoint

    path = Path(path)
    if not path.exists() and staging_folder(path).is_dir():  # a stopped run that was never finished: only DIR.partial exists
        path = staging_folder(path)
    if not path.exists():
        raise ValueError(f"nothing to resume at {path}: give the run's folder (its --out) or its checkpoint")
    folder = path.parent if path.is_file() else path
    out = folder.with_name(folder.name.removesuffix(".partial")) if folder.name.endswith(".partial") else folder
    if path.is_file():
        return out, path
    checkpoint = stopped_checkpoint(out) or (out / CHECKPOINT_FILE if (out / CHECKPOINT_FILE).is_file() else None)
    if checkpoint is None:
        raise ValueError(f"{path} holds no run to resume (no {CHECKPOINT_FILE} in {out} or {out}.partial)")
    return out, checkpoint


def settings_given_with_resume(args: Generate, prompt: str) -> list[str]:
    """The options of ``args`` that would change a resumed run's own settings."""
    from .config import validate_prompt

    given = [f"--{name}" for name in ("seed", "guidance", "model", "cfg", "resolution") if getattr(args, name) is not None]
    if args.preset != "default":
        given.append("--preset")
    if args.advanced != TrainConfig():
        given.append("--advanced.*")
    if args.prompt != DEFAULT_PROMPT and validate_prompt(args.prompt) != prompt:
        given.append("a prompt")
    return given


def recorded_export(folder: Path) -> ExportOptions | None:
    """The export options a run recorded in its config.json (None: no such file)."""
    import json

    from .config import dataclass_from_dict

    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return dataclass_from_dict(ExportOptions, json.loads(path.read_text()).get("export", {}), "export")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a run's config.json ({exc}); give the --export.* options again") from None


def plan_resume(args: Generate) -> GeneratePlan:
    """``--resume``: a stopped run continues in its own folder to its step count (or --steps); a
    finished one continues into a new --out, with --steps above its own."""
    from .checkpoint import read_checkpoint_info
    from .config import validate_config, validate_export
    from .files import staging_folder
    from .runs import check_output

    source, checkpoint = resume_target(args.resume)
    info = read_checkpoint_info(checkpoint)
    given = settings_given_with_resume(args, info.prompt)
    if given:
        raise ValueError(f"--resume continues the run with its own prompt and settings; leave out {', '.join(given)} "
                         "(--steps, --device, --threads, --quiet, --checkpoint-every, --out and --export.* may be given)")
    total = info.total_steps if args.steps is None else args.steps
    if total < info.total_steps:
        raise ValueError(f"the run has {info.total_steps} steps; --steps may raise that, not lower it (got {total})")
    stopped = checkpoint.resolve().parent == staging_folder(source).resolve()
    if stopped:
        out = source
        if args.out is not None and Path(args.out).resolve() != out.resolve():
            raise ValueError(f"--resume continues the stopped run in {out}; leave out --out (or give that folder)")
    else:
        if total <= info.step or args.out is None:
            raise ValueError(f"{checkpoint} is a finished run ({info.step} of {info.total_steps} steps); to train it further give "
                             f"--steps above {info.step} and a new --out")
        out = Path(args.out)
    cfg = replace(info.cfg, steps=total, device=args.device or info.cfg.device)
    validate_config(cfg)
    export = args.export
    if export == ExportOptions():  # the options the run was started with, unless others are given
        export = recorded_export(checkpoint.parent) or export
        validate_export(export)
    check_output(out, args.overwrite, resume=stopped)
    return GeneratePlan(info.prompt, cfg, export, out, overwrite=args.overwrite, resume_from=checkpoint)


def plan_generate(args: Generate) -> GeneratePlan:
    """Every check of ``generate``'s input, torch-free: the settings, the export options, the
    output folder, and for ``--resume`` the checkpoint's header and settings."""
    from .config import validate_config, validate_export, validate_prompt
    from .runs import check_output

    check_run_options(args)
    validate_export(args.export)
    if args.resume is not None:
        return plan_resume(args)
    prompt = validate_prompt(args.prompt)
    cfg = train_config(args)
    validate_config(cfg)
    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    check_output(out, args.overwrite)
    return GeneratePlan(prompt, cfg, args.export, out, args.overwrite)


def stop_message(out: Path, exc: BaseException) -> CommandStopped:
    """The one line for a run that was stopped (by a signal) or failed, with its checkpoint, if
    one was kept: where it is and how to continue."""
    from .checkpoint import CheckpointError, read_checkpoint_info
    from .runs import stopped_checkpoint

    checkpoint = stopped_checkpoint(out)
    kept = None
    if checkpoint is not None:
        try:
            info = read_checkpoint_info(checkpoint)
            kept = f"the checkpoint of step {info.step} of {info.total_steps} is {checkpoint}; continue with: dreamfusion generate --resume {out}"
        except CheckpointError:
            kept = f"{checkpoint} is kept but unreadable"
    if isinstance(exc, KeyboardInterrupt):
        signum = getattr(exc, "signum", signal.SIGINT)
        status = 128 + int(signum)
        if kept is None:
            return CommandStopped(f"interrupted ({signal.Signals(signum).name}) before the first checkpoint; nothing was written to {out}", status)
        return CommandStopped(f"interrupted ({signal.Signals(signum).name}): {kept}", status)
    return CommandStopped(f"error: {error_text(exc)}" + (f"; {kept}" if kept else ""), 1 if isinstance(exc, OSError) else 2)


def run_generate(args: Generate) -> Path:
    """``dreamfusion generate``: train, then write the run folder through a staging folder."""
    plan = plan_generate(args)
    from .pipeline import generate

    try:
        result = generate(plan.prompt, plan.cfg, plan.export, plan.out, overwrite=plan.overwrite, resume_from=plan.resume_from,
                          checkpoint_every=args.checkpoint_every, threads=args.threads, progress=not args.quiet, stop_on_signal=True,
                          on_message=lambda m: print(f"note: {m}", file=sys.stderr))
    except (KeyboardInterrupt, OSError, MemoryError) as exc:
        raise stop_message(plan.out, exc) from None
    t = result.timing
    resumed = f"; {result.steps - t['resumed_at']} after resuming at step {t['resumed_at']}," if "resumed_at" in t else ""
    print(f"wrote {plan.out} ({result.steps} iterations{resumed} in {t['seconds']:.0f} s, {t['it_per_s']:.1f} it/s)")
    return plan.out


# ----------------------------------------------------------------------------- export and render


def run_export(args: Export) -> Path:
    from .checkpoint import checkpoint_in, read_checkpoint_info
    from .config import validate_export
    from .runs import check_output

    # every check that can fail on bad input comes before anything is created or loaded
    validate_export(args.export)
    checkpoint = checkpoint_in(args.checkpoint)
    read_checkpoint_info(checkpoint)
    check_output(args.out, args.overwrite)

    from .checkpoint import load_scene
    from .runs import export_renderer, staged_output

    with staged_output(args.out, args.overwrite) as staging:
        scene, _, _ = load_scene(checkpoint)
        for note in export_renderer(scene, staging, args.export):
            print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}")
    return args.out


def check_render(args: Render) -> None:
    from .config import SHADING_MODES, validate_turntable

    if args.mode not in SHADING_MODES:
        raise ValueError(f"unknown shading mode {args.mode!r}; valid modes: {', '.join(SHADING_MODES)}")
    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".mp4", ".gif"):
        raise ValueError(f"output must end in .png, .mp4 or .gif, got {args.out.name!r}")
    if not 16 <= args.size <= 1024:
        raise ValueError(f"size must be between 16 and 1024 pixels, got {args.size}")
    if suffix != ".png":
        validate_turntable(args.frames, args.size)
    angles = (args.azimuth, args.elevation, args.light_elevation) + (() if args.light_azimuth is None else (args.light_azimuth,))
    if not all(math.isfinite(a) for a in angles):
        raise ValueError("camera and light angles must be finite numbers of degrees")
    if not 0.5 <= args.distance <= 100:
        raise ValueError(f"distance must be between 0.5 and 100, got {args.distance}")
    if not (0 <= args.light_intensity <= 10 and 0 <= args.ambient <= 10):
        raise ValueError(f"light intensity and ambient must be between 0 and 10, got {args.light_intensity} and {args.ambient}")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")


def run_render(args: Render) -> Path:
    from .checkpoint import checkpoint_in, read_checkpoint_info

    check_render(args)
    checkpoint = checkpoint_in(args.checkpoint)
    read_checkpoint_info(checkpoint)

    import imageio.v3 as iio
    import torch

    from .cameras import VIEW_FOCAL, Cameras, Lights, make_cameras, spherical_to_position
    from .checkpoint import load_scene
    from .export import save_turntable, to_uint8
    from .files import atomic_write

    scene, _, _ = load_scene(checkpoint)

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

    if args.out.suffix.lower() == ".png":
        img = render(make_cameras(args.azimuth, args.elevation, args.distance, VIEW_FOCAL))[0]
        atomic_write(args.out, lambda tmp: iio.imwrite(tmp, to_uint8(img), extension=".png"))
    else:
        save_turntable(render, args.out, frames=args.frames, size=args.size)
    print(f"wrote {args.out}")
    return args.out


# ----------------------------------------------------------------------------- batch, app, train-prior


def run_batch(args: Batch) -> int:
    """``dreamfusion batch``: the exit status is the number of failed prompts (130: interrupted)."""
    from .batch.prompts import read_prompts
    from .batch.run import run_batch as run_prompts
    from .batch.summary import report
    from .batch.tasks import ClusterOptions, import_ray

    import_ray("dreamfusion batch")  # without the extra, say how to install it before anything else
    check_run_options(args)
    prompts = read_prompts(args.prompts)
    if args.device is None and args.gpus_per_run and args.advanced.device == "cpu":
        args = replace(args, device="cuda")  # a run that asks Ray for a GPU uses it
    cluster = ClusterOptions(address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                             max_parallel=args.max_parallel)
    result = run_prompts(prompts, args.out, train_config(args), args.export, cluster, threads=args.threads, overwrite=args.overwrite,
                         prompt_file=args.prompts, quiet=args.quiet, checkpoint_every=args.checkpoint_every)
    print(report(result, args.out))
    return result.exit_status


def run_app(argv: list[str]) -> None:
    """``dreamfusion app ...``: this process becomes ``python -m app ...`` (the app's own options
    and --help; the library never imports the app)."""
    os.execv(sys.executable, [sys.executable, "-m", "app", *argv])


def run_train_prior(cfg: TrainPriorConfig) -> Path:
    from .config import validate_train_prior

    validate_train_prior(cfg)
    from .prior.train import train_prior

    return train_prior(cfg)


COMMANDS = {"generate": (Generate, run_generate), "batch": (Batch, run_batch), "export": (Export, run_export),
            "render": (Render, run_render), "app": (App, None), "train-prior": (TrainPriorConfig, run_train_prior)}


# ----------------------------------------------------------------------------- errors


def error_text(exc: BaseException) -> str:
    """One line for an error: an ``OSError`` as 'what: file', anything else as its message."""
    if isinstance(exc, MemoryError):
        return "out of memory; try smaller settings (--resolution, --advanced.field.resolution, --export.*)"
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{exc.strerror}: {where}" if where is not None else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def user_error(exc: BaseException) -> bool:
    """Bad input or a failing file system, told in one line: ``ValueError`` (settings, checkpoints,
    folders in use), ``OSError``, a prior that cannot load (``GuidanceError``) and safetensors' own
    errors. Looked up in ``sys.modules``: a module never imported raised nothing."""
    if isinstance(exc, (ValueError, OSError, MemoryError)):
        return True
    kinds = [getattr(sys.modules.get(name), attr, None) for name, attr in (("dreamfusion.guidance.base", "GuidanceError"),
                                                                          ("safetensors", "SafetensorError"))]
    return any(kind is not None and isinstance(exc, kind) for kind in kinds)


def raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["app"]:
        run_app(argv[1:])
    args = tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}, args=argv, prog="dreamfusion")
    handler = next(fn for cls, fn in COMMANDS.values() if type(args) is cls)
    previous = signal.signal(signal.SIGTERM, raise_interrupted)  # SIGTERM ends a command as Ctrl-C does: cleanly, in one line
    try:
        status = handler(args)
    except CommandStopped as exc:
        print(str(exc), file=sys.stderr)
        return exc.status
    except KeyboardInterrupt as exc:
        kept = "finished runs are kept in the batch folder" if handler is run_batch else "nothing was written"
        print(f"interrupted; {kept}", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except Exception as exc:
        if not user_error(exc):
            raise
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 1 if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) else 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status if type(status) is int else 0  # a command that counts failures (batch) says how many


if __name__ == "__main__":
    sys.exit(main())
