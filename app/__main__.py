"""``python -m app``: start the Gradio page and the live viser viewer and print both URLs.

Both bind 127.0.0.1 unless ``--host`` says otherwise (or the GRADIO_SERVER_NAME environment
variable, which Hugging Face Spaces sets to 0.0.0.0). On a Space (its SPACE_ID variable is set) or
with ``--public`` the app runs in public mode: see the README's "The app as a public Space"."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

if __package__ in (None, ""):  # run as a file (Spaces' app_file): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


#: environment variables a Space (or any host) sets to choose the app's default prior: a GPU Space
#: can default to Stable Diffusion while a CPU one keeps the embedded prior
GUIDANCE_ENV, MODEL_ENV, DEVICE_ENV = "DREAMFUSION_GUIDANCE", "DREAMFUSION_MODEL", "DREAMFUSION_DEVICE"
#: the priors a public server offers: ``name`` or ``name=model`` entries, comma-separated
MODELS_ENV = "DREAMFUSION_MODELS"
#: more names the server answers to (comma-separated; ``.example.org`` for its subdomains, ``*`` for any)
HOSTS_ENV = "DREAMFUSION_ALLOWED_HOSTS"


def space_overrides(environ: Mapping[str, str]) -> dict:
    """The default run settings the environment asks for ({} when it asks for none)."""
    from dreamfusion.config import USER_GUIDANCES

    out: dict = {}
    guidance = {}
    name = environ.get(GUIDANCE_ENV, "").strip()
    if name:
        if name not in USER_GUIDANCES:
            raise SystemExit(f"error: {GUIDANCE_ENV}={name!r} is not a prior this app offers ({', '.join(USER_GUIDANCES)})")
        guidance["name"] = name
    if environ.get(MODEL_ENV, "").strip():
        guidance["model"] = environ[MODEL_ENV].strip()
    if guidance:
        out["guidance"] = guidance
    if environ.get(DEVICE_ENV, "").strip():
        out["device"] = environ[DEVICE_ENV].strip()
    return out


def allowlist(value: str, default_name: str, default_model: str) -> dict[str, str]:
    """The operator's priors from ``DREAMFUSION_MODELS`` ('embedded, stable-diffusion=/models/sd15'):
    {guidance name: model ('' for its default)}; the server's default prior when the value is empty."""
    from dreamfusion.config import USER_GUIDANCES

    out: dict[str, str] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, _, model = entry.partition("=")
        name = name.strip()
        if name not in USER_GUIDANCES:
            raise SystemExit(f"error: {MODELS_ENV}: {name!r} is not a prior this app offers ({', '.join(USER_GUIDANCES)})")
        out[name] = model.strip()
    return out or {default_name: default_model}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description="DreamFusion text-to-3D: web page and live 3D viewer")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address both servers bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes them)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="Gradio port")
    p.add_argument("--viewer-port", type=int, default=8080, help="viser viewer port")
    p.add_argument("--no-viewer", action="store_true", help="do not start the viser viewer")
    p.add_argument("--viewer-url", default=None, help="URL the page's iframe uses for the viewer (default: viewer/ on the page's own port)")
    p.add_argument("--runs-dir", default="runs/app", help="where runs, checkpoints and exports are written (inside the working directory)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="runs trained at once, each in its own worker process (default: as many as the cores hold at --threads each)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each worker process")
    p.add_argument("--worker-nice", type=int, default=0,
                   help="niceness added to the worker processes (0-19): a higher value keeps the page quick under load, at some training speed")
    p.add_argument("--max-queue", type=int, default=None, help="runs waiting at most; a full queue answers 'busy' (default 20, public 8)")
    p.add_argument("--max-runs-kept", type=int, default=20, help="run folders kept on disk (oldest deleted)")
    p.add_argument("--max-steps", type=int, default=None, help="steps a visitor may ask for (default 20000, public 2400)")
    p.add_argument("--abandon-after", type=float, default=120.0,
                   help="seconds without a poll from a run's page after which the run is stopped (its checkpoint kept; 0: never)")
    p.add_argument("--public", action="store_true", default=None,
                   help="public mode: the operator's priors only (DREAMFUSION_MODELS), a bounded queue; on by itself on a Space")
    p.add_argument("--allowed-hosts", default=os.environ.get(HOSTS_ENV, ""),
                   help="more names the server answers to, comma-separated (default: this machine's own; on a Space, its SPACE_HOST)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the engine's default)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = parser().parse_args(argv)
    public = a.public if a.public is not None else bool(os.environ.get("SPACE_ID"))
    for flag, value in (("--threads", a.threads), ("--max-concurrent", a.max_concurrent), ("--max-queue", a.max_queue),
                        ("--max-steps", a.max_steps), ("--max-runs-kept", a.max_runs_kept)):
        if value is not None and value < (0 if flag == "--max-queue" else 1):
            raise SystemExit(f"error: {flag} must be {'0 or more' if flag == '--max-queue' else 'at least 1'}, got {value}")
    if not 0 <= a.worker_nice <= 19:
        raise SystemExit(f"error: --worker-nice must be between 0 and 19, got {a.worker_nice}")
    if a.abandon_after < 0:
        raise SystemExit(f"error: --abandon-after must be 0 (never) or more seconds, got {a.abandon_after}")

    from app.interface import create_app
    from dreamfusion.config import TrainConfig

    overrides = space_overrides(os.environ)
    if a.device:
        overrides["device"] = a.device
    base = TrainConfig().guidance
    g = overrides.get("guidance", {})
    models = allowlist(os.environ.get(MODELS_ENV, ""), g.get("name", base.name), g.get("model", base.model))
    hosts = tuple(h.strip() for h in a.allowed_hosts.split(",") if h.strip())
    if os.environ.get("SPACE_HOST"):
        hosts += (os.environ["SPACE_HOST"].strip(),)
    max_queue = a.max_queue if a.max_queue is not None else (8 if public else 20)
    try:
        handle = create_app(a.runs_dir, overrides, host=a.host, viewer_port=None if a.no_viewer else a.viewer_port,
                            max_concurrent=a.max_concurrent, max_runs_kept=a.max_runs_kept, threads=a.threads, viewer_public_url=a.viewer_url,
                            public=public, models=models if public else None, max_queue=max_queue, allowed_hosts=hosts,
                            abandon_after=a.abandon_after, max_steps=a.max_steps or (2400 if public else None),
                            manager_kwargs={"worker_nice": a.worker_nice})
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        url = handle.launch(port=a.port)
    except RuntimeError as exc:
        handle.close()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        errors = handle.manager.wait_ready(timeout=300)
        for e in errors:
            say(f"warning: the default prior did not load in a worker: {e}", sys.stderr)
        say(f"DreamFusion app:   {url}{'  (public mode)' if public else ''}")
        if handle.viewer is not None:
            say(f"Live 3D viewer:    {handle.viewer.url.replace('0.0.0.0', '127.0.0.1')}  (also {handle.viewer_proxy_url})")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("shutting down")
    finally:  # the workers and the server end with the app, however it ends
        handle.close()


def say(message: str, stream: TextIO | None = None) -> None:
    """A line for the operator. Where nobody reads any more (the pipe a supervisor gave the app is
    closed), the line is dropped: the app still serves, and still shuts down cleanly on SIGTERM."""
    try:
        print(message, file=stream or sys.stdout, flush=True)
    except (BrokenPipeError, ValueError, OSError):
        with contextlib.suppress(OSError, ValueError):  # point the stream at nothing, so Python's exit does not flush into the broken pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), (stream or sys.stdout).fileno())


if __name__ == "__main__":
    main()
