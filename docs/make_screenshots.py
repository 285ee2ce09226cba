"""Refresh the README's screenshots of the app with the shipped prior: the page as a first-time
visitor finds it, a run in progress, the finished run, and the live viewer.

    python docs/make_screenshots.py [--example "a red mushroom" --steps 600 --seconds 60 --chromium /usr/bin/chromium]

Starts the app on free local ports (as ``python -m app`` does), clicks an example in headless
Chromium, and writes ``docs/app_first_visit.png``, ``docs/app_page.png`` (in progress),
``docs/app_finished.png`` and ``docs/app_viewer.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.headless import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="a red mushroom", help="the example the visitor clicks")
    ap.add_argument("--steps", type=int, default=600, help="iterations of the run (the page's Steps setting)")
    ap.add_argument("--seconds", type=float, default=60.0, help="training time before the in-progress screenshots")
    ap.add_argument("--chromium", default=CHROMIUM)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from app import create_app

    with tempfile.TemporaryDirectory() as runs_dir:
        handle = create_app(runs_dir, {"steps": args.steps}, viewer_port=free_port())
        handle.launch(port=free_port())
        handle.manager.wait_ready()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(handle.url)
                page.get_by_text("The built-in prior knows").wait_for(timeout=60000)
                time.sleep(2)
                page.screenshot(path=str(args.out / "app_first_visit.png"))
                page.locator("#examples").get_by_text(args.example, exact=True).click()
                page.get_by_text("it/s").first.wait_for(timeout=60000)
                time.sleep(args.seconds)
                page.screenshot(path=str(args.out / "app_page.png"), full_page=True)
                frame = page.locator("#viewer iframe").first  # the visitor's own viewer, as the page embeds it
                frame.scroll_into_view_if_needed()
                time.sleep(8)
                frame.screenshot(path=str(args.out / "app_viewer.png"))
                page.get_by_text("Done").first.wait_for(timeout=3600 * 1000)
                page.locator("#result-mesh canvas").first.wait_for(timeout=60000)
                time.sleep(8)  # the 3D view and the turntable load
                page.locator("#result-mesh").scroll_into_view_if_needed()
                page.screenshot(path=str(args.out / "app_finished.png"), full_page=True)
                browser.close()
        finally:
            handle.close()
    print(f"wrote {', '.join(str(args.out / n) for n in ('app_first_visit.png', 'app_page.png', 'app_finished.png', 'app_viewer.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
