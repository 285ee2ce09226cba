"""What the live viewer costs training: it/s of an app run alone, with one viewer open and still,
and with one viewer whose camera keeps moving (low-resolution renders while it moves).

    python benchmarks/viewer_load.py [--seconds 20 --warmup 150 --threads 1 --chromium /usr/bin/chromium]

Starts the app (its page, one worker process and the viser viewer) on free local ports with the
shipped prior, as ``python -m app`` does, trains "a red cube" in the worker, and opens that
visitor's own viewer (through the page's port, as the page embeds it) in headless Chromium. The
viewer renders in the page's process, training in the worker's. The budget: training keeps at
least 70% of its solo it/s with one viewer open.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.headless import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402
from app.jobs import Run  # noqa: E402

BUDGET = 0.7


def its(run: Run, seconds: float, during: Callable[[float], object] | None = None) -> float:
    s0, t0 = run.step, time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        if during is not None:
            during(time.perf_counter() - t0)
        time.sleep(0.1)
    return (run.step - s0) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each measurement")
    ap.add_argument("--warmup", type=int, default=150, help="iterations before measuring (an object has formed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training thread (the app's default is 1)")
    ap.add_argument("--chromium", default=CHROMIUM)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} cores for torch, torch {torch.__version__}; "
          f"training thread {args.threads} torch thread(s), viewer renders 1 thread")
    from app import create_app

    with tempfile.TemporaryDirectory() as runs_dir:
        handle = create_app(runs_dir, viewer_port=free_port(), max_concurrent=1, threads=args.threads, manager_kwargs={"checkpoint_every": 0})
        handle.launch(port=free_port())
        manager, viewer = handle.manager, handle.viewer
        try:
            manager.wait_ready()
            run = manager.submit("bench", "a red cube", steps=20000)
            while run.step < args.warmup:
                time.sleep(0.2)
            alone = its(run, args.seconds)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 900, "height": 640})
                page.goto(handle.viewer_proxy_url + f"k/{manager.viewer_key('bench')}/")
                while not viewer.clients or next(iter(viewer.clients.values())).renders < 2:
                    time.sleep(0.1)
                view = next(iter(viewer.clients.values()))
                r0 = view.renders
                still = its(run, args.seconds)
                still_renders = view.renders - r0

                def orbit(t: float):  # the user drags the camera around the object
                    a = 0.6 * t
                    view.client.camera.position = (2.6 * math.cos(a), 2.6 * math.sin(a), 1.1)
                    view.client.camera.look_at = (0.0, 0.0, 0.0)

                r0 = view.renders
                moving = its(run, args.seconds, during=orbit)
                moving_renders = view.renders - r0
                browser.close()
        finally:
            handle.close()
    print("\n| viewer | training it/s | of solo | viewer renders/s |")
    print("|---|---|---|---|")
    print(f"| none | {alone:.2f} | 100% | - |")
    print(f"| one, camera still | {still:.2f} | {still / alone:.0%} | {still_renders / args.seconds:.1f} |")
    print(f"| one, camera orbiting | {moving:.2f} | {moving / alone:.0%} | {moving_renders / args.seconds:.1f} |")
    worst = min(still, moving) / alone
    print(f"\nbudget: training keeps >= {BUDGET:.0%} of its solo it/s with one viewer open: "
          f"{'MET' if worst >= BUDGET else 'MISSED'} ({worst:.0%} at worst)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
