"""What the app's browser tests, its load benchmark and its screenshot script share: a free local
port, and how to start Debian's Chromium headless on this offline machine (Playwright drives it
through ``executable_path``; without the background-networking flags Chromium keeps trying to
reach hosts it cannot)."""

from __future__ import annotations

import socket

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
