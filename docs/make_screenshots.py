"""Refresh the README's screenshots of the app: the page and the live viewer, with the shipped
prior, as a user sees them after about a minute of training.

    python docs/make_screenshots.py [--prompt "a snowman" --seconds 90 --chromium /usr/bin/chromium]

Starts the app on free local ports (as ``python -m app`` does), generates through the page in
headless Chromium, and writes ``docs/app_page.png`` and ``docs/app_viewer.png``.
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
    ap.add_argument("--prompt", default="a snowman")
    ap.add_argument("--seconds", type=float, default=90.0, help="training time before the screenshots")
    ap.add_argument("--chromium", default=CHROMIUM)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from app import create_app

    with tempfile.TemporaryDirectory() as runs_dir:
        handle = create_app(runs_dir, viewer_port=free_port())
        handle.launch(port=free_port())
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(handle.url)
                page.get_by_label("Prompt", exact=True).fill(args.prompt)
                page.get_by_role("button", name="Generate").click()
                page.get_by_text("it/s").first.wait_for(timeout=60000)
                page.locator("iframe").first.scroll_into_view_if_needed()
                time.sleep(args.seconds)
                page.screenshot(path=str(args.out / "app_page.png"), full_page=True)
                viewer = browser.new_page(viewport={"width": 900, "height": 640})
                viewer.goto(handle.viewer.url)
                time.sleep(8)
                viewer.screenshot(path=str(args.out / "app_viewer.png"))
                browser.close()
        finally:
            handle.close()
    print(f"wrote {args.out / 'app_page.png'} and {args.out / 'app_viewer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
