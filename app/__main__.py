"""``python -m app``: start the Gradio page and the live viser viewer and print both URLs.

Both bind 127.0.0.1 unless ``--host`` says otherwise (or the GRADIO_SERVER_NAME environment
variable, which Hugging Face Spaces sets to 0.0.0.0)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file (Spaces' app_file): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


#: environment variables a Space (or any host) sets to choose the app's default prior: a GPU Space
#: can default to Stable Diffusion while a CPU one keeps the embedded prior
GUIDANCE_ENV, MODEL_ENV, DEVICE_ENV = "DREAMFUSION_GUIDANCE", "DREAMFUSION_MODEL", "DREAMFUSION_DEVICE"


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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m app", description="DreamFusion text-to-3D: web page and live 3D viewer")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address both servers bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes them)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="Gradio port")
    p.add_argument("--viewer-port", type=int, default=8080, help="viser viewer port")
    p.add_argument("--no-viewer", action="store_true", help="do not start the viser viewer")
    p.add_argument("--viewer-url", default=None, help="URL the page's iframe uses for the viewer (default: viewer/ on the page's own port)")
    p.add_argument("--runs-dir", default="runs/app", help="where runs, checkpoints and exports are written")
    p.add_argument("--max-concurrent", type=int, default=1, help="optimisations running at once (others queue)")
    p.add_argument("--max-runs-kept", type=int, default=20, help="run folders kept on disk (oldest deleted)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each training thread")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the engine's default)")
    a = p.parse_args(argv)

    from app.interface import create_app

    overrides = space_overrides(os.environ)
    if a.device:
        overrides["device"] = a.device
    handle = create_app(a.runs_dir, overrides, host=a.host, viewer_port=None if a.no_viewer else a.viewer_port,
                        max_concurrent=a.max_concurrent, max_runs_kept=a.max_runs_kept, threads=a.threads, viewer_public_url=a.viewer_url)
    try:
        url = handle.launch(port=a.port)
    except RuntimeError as exc:
        handle.close()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"DreamFusion app:   {url}", flush=True)
    if handle.viewer is not None:
        print(f"Live 3D viewer:    {handle.viewer.url.replace('0.0.0.0', '127.0.0.1')}  (also {handle.viewer_proxy_url})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down")
        handle.close()


if __name__ == "__main__":
    main()
