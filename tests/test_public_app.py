"""The app as a public Space, tried as its visitors and an attacker would: real servers on free
ports, API sessions through gradio_client, a real headless Chromium for what a page shows and runs,
the tiny random prior in one worker process."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest
from waiting import wait_for  # tests/ is on sys.path

pytest.importorskip("gradio")
pytest.importorskip("viser")

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app.headless import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402
from app.jobs import RunError  # noqa: E402

MAX_QUEUE = 5
#: what the attacker types: a script that would read and change the page of every visitor who sees it
SCRIPT = "top.localStorage.setItem('pwned','1');top.document.title='PWNED'"
XSS_PROMPT = f'a red cube <iframe srcdoc="<script>{SCRIPT}</script>"></iframe>'
IMG_PROMPT = "a photo of a squirrel <img src=x onerror=\"top.localStorage.setItem('pwned2','1')\"> see http://evil.example/x"



@pytest.fixture(scope="module")
def public_app(tiny_prior_dir, tmp_path_factory):
    from app import create_app

    overrides = {"render_size": 32, "views": 1, "preview_every": 2,
                 "field": {"resolution": 24, "blob_density": 20.0, "blob_radius": 0.5, "blob_fade_steps": 0}}
    handle = create_app(tmp_path_factory.mktemp("public"), overrides, viewer_port=free_port(), max_concurrent=1, public=True,
                        models={"embedded": str(tiny_prior_dir)}, max_queue=MAX_QUEUE,
                        manager_kwargs={"checkpoint_every": 5},
                        export_defaults={"mesh_resolution": 32, "video_frames": 4, "video_size": 64})
    handle.launch(port=free_port())
    assert handle.manager.wait_ready() == []
    yield handle
    handle.close()


class Visitor:
    """An API visitor: a gradio_client session that sends ``token`` as its owner token."""

    def __init__(self, url: str, token: str | None = None):
        self.client = Client(url, verbose=False)
        self.token = token

    def call(self, *args, api: str):
        return self.client.predict(*args, self.token, api_name=api)

    def generate(self, prompt: str, steps: int = 3, model: str = ""):
        return self.call(prompt, steps, 0, "embedded", model, 3.0, 32, api="/generate")

    def info(self) -> dict:
        return self.call(api="/poll")[1]


def stop_everything(manager) -> None:
    for run in list(manager.runs.values()):
        if run.active:
            try:
                manager.stop(run.owner, run.id)
            except RunError:
                pass
    wait_for(lambda: not any(r.active for r in manager.runs.values()), timeout=60)


def test_a_second_session_cannot_reach_the_first_ones_run(public_app):
    url, manager = public_app.url, public_app.manager
    a, b = Visitor(url, "visitor-a-" + "x" * 16), Visitor(url, "visitor-b-" + "y" * 16)
    a.generate("a red cube", steps=5000)
    run = manager.get(a.info()["run"])
    wait_for(lambda: run.checkpoint_step >= 5 and run.status == "running")
    for api, args in (("/pause", (run.id,)), ("/stop", (run.id,)), ("/resume", (run.id,))):
        with pytest.raises(AppError, match="of yours"):
            b.call(*args, api=api)
    with pytest.raises(AppError, match="no run yet"):
        b.call("a blue cube", 5, api="/refine")
    with pytest.raises(AppError, match="no run yet"):
        b.call(["glb"], api="/export")
    assert b.info()["run"] is None and run.status == "running"
    # its files: nothing under the runs folder is served, to anyone
    for name in ("checkpoint.safetensors", "run.json", "preview.png"):
        assert (run.folder / name).is_file()
        r = httpx.get(f"{url}gradio_api/file={run.folder / name}")
        assert r.status_code in (403, 404), (name, r.status_code)
    # its owner's export reaches its owner, as a copy under a name made of its content's hash
    files, mesh, _ = a.call(["glb"], api="/export")
    assert mesh.endswith("mesh.glb") and str(run.folder) not in mesh
    # no server path in what a visitor's poll sees
    assert str(manager.runs_dir) not in repr(a.info()) and str(manager.runs_dir) not in a.call(api="/poll")[0]
    # a model that is not the operator's is refused, with one message, and nothing is loaded or queued
    for model in ("/etc", "/no/such/folder", "someone/some-model"):
        with pytest.raises(AppError, match="operator"):
            b.generate("a red cube", model=model)
    assert b.info()["run"] is None
    # requests under a name that is not this server's are refused (DNS rebinding)
    assert httpx.get(url, headers={"host": "evil.example"}).status_code == 400
    assert httpx.get(url, headers={"host": f"localhost:{public_app.port}"}).status_code == 200
    stop_everything(manager)


def test_a_full_queue_answers_busy(public_app):
    """200 Generates from 200 new sessions: one runs, at most MAX_QUEUE wait, the rest are told
    the server is busy (and when to come back)."""
    manager = public_app.manager
    wait_for(lambda: all(w.run_id is None and w.ready.is_set() for w in manager.workers), timeout=120)  # the last test's runs written
    client = Client(public_app.url, verbose=False)
    accepted, busy = 0, []
    for _ in range(200):
        client.session_hash = uuid.uuid4().hex  # a new session: a new owner, as a new browser would be
        try:
            client.predict("a red cube", 20000, 0, "embedded", "", 3.0, 32, None, api_name="/generate")
            accepted += 1
            if accepted == 1:  # the first one trains (the worker takes it); the rest can only wait
                wait_for(lambda: not manager.queue, timeout=30)
        except AppError as exc:
            busy.append(str(exc))
    try:
        assert accepted == 1 + MAX_QUEUE and len(manager.queue) <= MAX_QUEUE
        assert len(busy) == 200 - accepted and all("busy" in m and "try again in about" in m for m in busy)
        assert len([r for r in manager.runs.values() if r.active]) == accepted
        # and Gradio's queue kept no table of them: it rebuilt one (pandas, up to 10,000 events)
        # after every event, a fifth of the page's CPU under polling load
        queue = public_app.demo._queue
        assert len(queue.event_analytics) <= 100 and queue.cached_event_analytics_summary == {"functions": {}}
    finally:
        stop_everything(manager)


def test_a_prompt_is_text_in_every_visitors_page_and_viewer(public_app, tmp_path, monkeypatch):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium")
    manager = public_app.manager
    attacker = Visitor(public_app.url, "attacker-" + "z" * 16)
    attacker.generate(XSS_PROMPT, steps=3)
    attacked = manager.get(attacker.info()["run"])
    wait_for(lambda: attacked.status == "done", timeout=60)
    stranger = Visitor(public_app.url, "stranger-" + "w" * 16)  # a run in progress: no other visitor's viewer shows it
    stranger.generate("a green sphere", steps=5000)
    in_progress = manager.get(stranger.info()["run"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(public_app.url)
            page.locator("#gallery img").first.wait_for(timeout=30000)
            # the gallery shows the attacker's prompt as its caption, as text
            wait_for(lambda: "<iframe srcdoc=" in page.locator("#gallery").inner_text(), timeout=15)
            assert page.locator("#gallery iframe").count() == 0
            # the visitor's viewer (no run of its own yet) shows the newest finished result, not the
            # stranger's run in progress, and the prompt as text
            frame_el = page.locator("#viewer iframe").first
            frame_el.scroll_into_view_if_needed()
            view = wait_for(lambda: next(iter(public_app.viewer.clients.values()), None), timeout=30)
            wait_for(lambda: view.run_id == attacked.id, timeout=30)
            viewer = page.frame_locator("#viewer iframe")
            wait_for(lambda: "<iframe srcdoc=" in viewer.locator("body").inner_text(), timeout=30)
            assert viewer.locator("iframe").count() == 0 and view.run_id != in_progress.id
            # a prompt with an image that would run script and an address: text, no image, no link,
            # in the status line and in the note about an unknown prompt
            page.get_by_label("Prompt", exact=True).fill(IMG_PROMPT)
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("see http://evil.example/x").first.wait_for(timeout=30000)
            wait_for(lambda: "<img src=x onerror=" in page.locator("#status").inner_text(), timeout=15)
            assert page.locator("#status img").count() == 0 and page.locator("#status a").count() == 0
            # a prompt far from what the prior knows: the note quotes it, as text
            page.get_by_text("is far from all of them").first.wait_for(timeout=30000)
            assert "<img src=x onerror=" in " ".join(t.inner_text() for t in page.locator(".toast-body").all())
            assert page.locator(".toast-body img").count() == 0 and page.locator(".toast-body a").count() == 0
            time.sleep(2.0)
            # nothing ran: the page's storage holds only its own token, its title is its own
            assert page.evaluate("Object.keys(localStorage)") == ["dreamfusion-owner"]
            assert page.title() == "DreamFusion"
            page.screenshot(path=str(tmp_path / "public_page.png"), full_page=True)
            page.close()

            # defence in depth: with the escaping undone, the viewer's policy still blocks the script
            import app.viewer as viewer_module

            monkeypatch.setattr(viewer_module, "markdown_text", lambda t: t)
            raw = browser.new_page(viewport={"width": 900, "height": 640})
            raw.goto(public_app.viewer_proxy_url)  # no key: the newest finished result, the attacker's
            wait_for(lambda: raw.locator("iframe").count() > 0, timeout=30)  # the markup reached the page unescaped ...
            time.sleep(2.0)
            assert raw.evaluate("localStorage.getItem('pwned')") is None and raw.title() != "PWNED"  # ... and did not run
            raw.close()
        finally:
            browser.close()
            stop_everything(manager)
