"""The interactive app: the Gradio page through gradio_client and a headless Chromium, and the
live viser viewer. Servers start on free ports on 127.0.0.1 and use the tiny random prior."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_for  # tests/ is on sys.path

pytest.importorskip("gradio")
pytest.importorskip("viser")

from gradio_client import Client  # noqa: E402

from app.headless import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402
from app.jobs import RunError  # noqa: E402
from dreamfusion.checkpoint import read_checkpoint  # noqa: E402


def non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP: nothing is sent
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


@pytest.fixture(scope="module")
def app(tiny_prior_dir, tmp_path_factory):
    from app import create_app

    # a big blob that stays (20 / 0.5, no fade): the tiny random prior builds nothing, and the
    # viewer's tests need an object to look at after hundreds of steps
    overrides = {"render_size": 32, "views": 1, "preview_every": 2,
                 "field": {"resolution": 24, "blob_density": 20.0, "blob_radius": 0.5, "blob_fade_steps": 0},
                 "guidance": {"model": str(tiny_prior_dir)}}
    handle = create_app(tmp_path_factory.mktemp("runs"), overrides, viewer_port=free_port(), max_concurrent=1,
                        viewer_kwargs={"full_size": 96, "low_size": 32}, export_defaults={"mesh_resolution": 32, "video_frames": 8, "video_size": 64})
    handle.launch(port=free_port())
    assert handle.manager.wait_ready() == []
    yield handle
    handle.close()



class User:
    """One browser (or API user) of the page: a gradio_client session that sends ``token`` as
    its owner token (what a browser keeps in localStorage; None: an API client without one,
    owned by its session)."""

    def __init__(self, url: str, token: str | None):
        self.client = Client(url, verbose=False)
        self.token = token

    def predict(self, *args, api_name: str):
        return self.client.predict(*args, self.token, api_name=api_name)


def info(user: User) -> dict:
    return user.predict(api_name="/poll")[1]


def generate(client: User, prompt: str, steps: int, tiny_prior_dir, **kw):
    args = dict(n_steps=steps, s=0, gname="embedded", gmodel=str(tiny_prior_dir), gscale=20, res=32)
    args.update(kw)
    return client.predict(prompt, args["n_steps"], args["s"], args["gname"], args["gmodel"], args["gscale"], args["res"], api_name="/generate")


@pytest.fixture(scope="module")
def clients(app):
    a, b = User(app.url, "browser-a-" + "x" * 16), User(app.url, None)
    assert a.client.session_hash != b.client.session_hash
    return a, b


def test_servers_bind_loopback(app):
    assert app.viewer.host == "127.0.0.1"
    assert app.host == "127.0.0.1" and app.url.startswith("http://127.0.0.1:")
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    for port in (app.port, app.viewer.port):
        with socket.socket() as s:
            s.settimeout(2)
            with pytest.raises(OSError):
                s.connect((ip, port))


def test_generate_refine_export(app, clients, tiny_prior_dir):
    import trimesh

    a, _ = clients
    status, run_id = generate(a, "a red cube", 400, tiny_prior_dir)
    assert run_id and "a red cube" in status
    wait_for(lambda: info(a)["step"] >= 3)
    # paused first, so the refinement lands mid-run however fast the tiny prior's steps are
    # (refining a running run straight away raced the run's end on a fast machine)
    a.predict(run_id, api_name="/pause")
    a.predict("a blue cube", 6, api_name="/refine")
    assert info(a)["status"] == "paused"
    a.predict(run_id, api_name="/resume")
    i = wait_for(lambda: (lambda i: i if i["status"] == "done" else None)(info(a)), timeout=120)
    assert i["total_steps"] == 406 and i["step"] == 406
    assert [p for _, p in i["prompts"]] == ["a red cube", "a blue cube"]
    assert 0 < i["prompts"][1][0] < 400  # refined mid-run, on the same scene
    run = app.manager.get(run_id)
    meta, _ = read_checkpoint(run.folder / "checkpoint.safetensors")
    assert (meta["prompt"], int(meta["step"])) == ("a blue cube", 406)  # what the worker trained
    files, mesh, video = a.predict(["glb", "textured_glb", "obj", "video"], api_name="/export")
    names = sorted(Path(f).name for f in files)
    assert names == ["mesh.glb", "mesh.obj", "mesh_textured.glb", "turntable.mp4"]
    glb = trimesh.load(next(f for f in files if f.endswith("mesh.glb")), force="mesh")
    assert len(glb.vertices) > 0 and len(glb.faces) > 0
    assert Path(mesh).name == "mesh.glb"  # the lit GLB in the 3D view where both were written
    # the textured GLB is offered for download: UVs and a baked texture
    textured = trimesh.load(next(f for f in files if f.endswith("mesh_textured.glb")), force="mesh")
    assert len(textured.faces) == len(glb.faces) and textured.visual.uv.shape == (len(textured.vertices), 2)
    texture = np.asarray(textured.visual.material.baseColorTexture.convert("RGB"))
    assert texture.shape[0] >= 256 and texture.std() > 0  # a picture, not one flat colour
    # exported alone, it is what the 3D view shows
    files, mesh, _ = a.predict(["textured_glb"], api_name="/export")
    assert [Path(f).name for f in files] == ["mesh_textured.glb"] and Path(mesh).name == "mesh_textured.glb"


def test_ownership_and_bad_input(app, clients, tiny_prior_dir):
    from gradio_client.exceptions import AppError

    a, b = clients
    run_a = info(a)["run"]
    assert run_a is not None
    for action in ("/pause", "/stop"):
        with pytest.raises(AppError, match="of yours"):
            b.predict(run_a, api_name=action)
    with pytest.raises(AppError, match="no run yet"):
        b.predict(["glb"], api_name="/export")
    with pytest.raises(AppError, match="no run yet"):
        b.predict("a hat", 0, api_name="/refine")
    with pytest.raises(AppError, match="prompt is empty"):
        generate(b, "   ", 10, tiny_prior_dir)
    with pytest.raises(AppError, match="steps must be between|less than minimum"):
        generate(b, "a cube", -5, tiny_prior_dir)
    with pytest.raises(AppError, match="resolution must be at most"):
        generate(b, "a cube", 10, tiny_prior_dir, res=100000)
    with pytest.raises(AppError, match="guidance weight must be between"):
        generate(b, "a cube", 10, tiny_prior_dir, gscale=1e9)
    with pytest.raises(AppError, match="not in the list of choices"):
        generate(b, "a cube", 10, tiny_prior_dir, gname="imagen")
    # one optimisation at a time: A runs, B queues and sees its position, a second Generate fails
    generate(a, "a green sphere", 2000, tiny_prior_dir)
    with pytest.raises(AppError, match="still running"):
        generate(a, "a green sphere", 10, tiny_prior_dir)
    generate(b, "a yellow cone", 10, tiny_prior_dir)
    ib = info(b)
    assert ib["status"] == "queued" and ib["queue_position"] == 1
    assert "position <b>1</b>" in b.predict(api_name="/poll")[0]
    b.predict("", api_name="/stop")
    assert info(b)["status"] == "stopped"
    with pytest.raises(AppError, match="not running|is done|already"):
        b.predict("", api_name="/pause")
    assert info(a)["status"] == "running"  # the server kept going
    # a reload of A's page is a new session with the same browser token: it keeps control
    reloaded = User(app.url, a.token)
    assert reloaded.client.session_hash != a.client.session_hash
    assert info(reloaded)["run"] == info(a)["run"]
    reloaded.predict("", api_name="/pause")
    assert info(a)["status"] == "paused"
    reloaded.predict("", api_name="/resume")
    assert info(a)["status"] == "running"
    # another browser's token, or none, controls nothing of A's
    other = User(app.url, "browser-c-" + "y" * 16)
    assert info(other)["run"] is None
    with pytest.raises(AppError, match="of yours"):
        other.predict(info(a)["run"], api_name="/stop")


def _centre(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)
    h, w = img.shape[:2]
    return img[h // 2 - h // 6:h // 2 + h // 6, w // 2 - w // 6:w // 2 + w // 6]


def _its(run, seconds=3.0) -> float:
    s0, t0 = run.step, time.perf_counter()
    time.sleep(seconds)
    return (run.step - s0) / (time.perf_counter() - t0)


def viewer_of(app, user) -> str:
    """The address of a user's own viewer, as their page embeds it (through the page's port)."""
    return app.viewer_proxy_url + f"k/{app.manager.viewer_key('browser:' + user.token)}/"


def save_screenshot(png: bytes, tmp_path: Path, name: str) -> None:
    """Kept with the test's files for a look after a failure (the README's screenshots come
    from docs/make_screenshots.py, with the shipped prior)."""
    (tmp_path / name).write_bytes(png)


def test_viewer_through_the_page_port(app):
    """One port: viser's client and its websocket are served under /viewer/ of the page's port."""
    import httpx

    r = httpx.get(app.url + "viewer", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/viewer/")
    r = httpx.get(app.viewer_proxy_url)
    direct = httpx.get(app.viewer.url + "/", headers={"accept-encoding": "identity"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == direct.content and b"<html" in r.content[:200]
    assert httpx.get(app.url + "viewer/no-such-file.js").status_code == 404
    # a visitor's own viewer: the same page under its key, with a policy that allows viser's own
    # boot script (by hash) and no other inline script, frame or plugin
    keyed = httpx.get(app.viewer_proxy_url + "k/" + "ab" * 16 + "/")
    assert keyed.status_code == 200 and keyed.content == direct.content
    csp = keyed.headers["content-security-policy"]
    assert "'sha256-" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    assert "frame-src 'none'" in csp and "object-src 'none'" in csp
    assert httpx.get(app.viewer_proxy_url + "k/not-a-key/").status_code == 404


def test_viewer_proxy_reports_an_unreachable_viewer():
    import fastapi
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from app.proxy import add_viewer_proxy

    server = fastapi.FastAPI()
    add_viewer_proxy(server, free_port())  # nothing listens there
    client = TestClient(server)
    r = client.get("/viewer/")
    assert r.status_code == 502 and "not reachable" in r.text
    with pytest.raises(WebSocketDisconnect) as exc:
        with client.websocket_connect("/viewer") as ws:
            ws.receive_bytes()
    assert exc.value.code == 1011


def test_viewer_and_page_in_browser(app, clients, tiny_prior_dir, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium")
    a, _ = clients
    current = info(a)["run"]  # the long run started by the previous test, if it ran
    run = app.manager.get(current) if current else None
    if run is None or run.status != "running":
        generate(a, "a green sphere", 2000, tiny_prior_dir)
        run = app.manager.get(info(a)["run"])
    wait_for(lambda: run.started and run.step > 5)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            its_alone = _its(run)
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(viewer_of(app, a))  # A's own viewer: it follows A's run
            view = wait_for(lambda: next(iter(app.viewer.clients.values()), None), timeout=30)
            assert view.owner == "browser:" + a.token
            wait_for(lambda: view.renders >= 2 and view.run_id == run.id, timeout=30)
            its_viewer = _its(run)
            print(f"\ntraining it/s: {its_alone:.2f} without a viewer client, {its_viewer:.2f} with one "
                  f"({view.renders} viewer renders so far)")
            assert its_viewer > 0.3 * its_alone
            time.sleep(0.5)
            shot1 = page.screenshot()
            save_screenshot(shot1, tmp_path, "app_viewer.png")
            c1 = _centre(shot1)
            assert np.abs(c1 - 255).mean() > 5 and c1.std() > 3, "the viewer's centre is blank"
            # the frustums are the cameras training actually drew (sent by the worker), and move with it
            poses = wait_for(lambda: list(view.poses), timeout=10)
            assert len(poses) == len(run.cameras) > 0
            radii = [float(np.linalg.norm(c2w[:, 3])) for c2w, _ in poses]
            cam = run.cfg.camera
            assert all(cam.distance_range[0] - 1e-4 <= r <= cam.distance_range[1] + 1e-4 for r in radii)
            first = [c2w.copy() for c2w, _ in poses]
            wait_for(lambda: any(not np.allclose(c2w, q) for (c2w, _), q in zip(view.poses, first, strict=False)), timeout=10)
            assert all(h.visible for h in view.frustums[:len(view.poses)])
            # the render follows training
            n = view.renders
            wait_for(lambda: view.renders >= n + 2, timeout=30)
            time.sleep(0.5)
            c2 = _centre(page.screenshot())
            assert np.abs(c2 - c1).mean() > 0.2, "the viewer did not change while training"
            # relighting changes what the viewer shows, not training
            a.predict("", api_name="/pause")
            time.sleep(1.0)
            wait_for(lambda: view.last_size >= 96, timeout=30)  # a still view of a paused run: sharper than full_size, step by step
            n = view.renders
            c3 = _centre(page.screenshot())
            step = run.step
            view.controls["ambient"].value = 1.0
            view.controls["light_intensity"].value = 0.0
            wait_for(lambda: view.renders > n, timeout=30)
            time.sleep(0.7)
            c4 = _centre(page.screenshot())
            assert np.abs(c4 - c3).mean() > 1.0, "relighting did not change the viewer"
            view.controls["mode"].value = "normals"
            n = view.renders
            wait_for(lambda: view.renders > n, timeout=30)
            time.sleep(0.7)
            c5 = _centre(page.screenshot())
            assert np.abs(c5 - c4).mean() > 1.0, "the shading mode did not change the viewer"
            assert run.step == step and run.status == "paused"
            # still, the paused scene is refined up to the canvas (640 px high here: capped at max_size)
            wait_for(lambda: view.last_size == app.viewer.max_size, timeout=60)
            a.predict("", api_name="/stop")
            wait_for(lambda: run.status == "stopped", timeout=30)
            assert (run.folder / "checkpoint.safetensors").is_file()  # a stopped run keeps its checkpoint
            page.close()
            wait_for(lambda: not app.viewer.clients, timeout=10)  # the disconnect is handled

            # viewer clients that open and close at once leave nothing behind
            for _ in range(3):
                quick = browser.new_page()
                quick.goto(app.viewer_proxy_url, wait_until="commit")
                quick.close()
            wait_for(lambda: not app.viewer.clients, timeout=15)

            # the page: a browser session generates through the UI and sees progress
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app.url)
            page.get_by_label("Prompt", exact=True).fill("a red cube")
            page.locator("#settings").get_by_text("Settings").first.click()
            page.get_by_label("Steps", exact=True).fill("1777")
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("Running").first.wait_for(timeout=30000)
            page.get_by_text("it/s").first.wait_for(timeout=30000)
            # the embedded viewer: an iframe on the page's own port (/viewer/k/<key>/, proxied to viser),
            # following this page's own run; Chromium does not run off-screen iframes' frames
            frame = page.locator("#viewer iframe").first
            assert re.fullmatch(r"viewer/k/[0-9a-f]{32}/", frame.get_attribute("src"))
            frame.scroll_into_view_if_needed()
            mine = wait_for(lambda: next((r for r in app.manager.runs.values() if r.prompt == "a red cube" and r.status == "running"), None))
            view = wait_for(lambda: next((v for v in app.viewer.clients.values() if v.run_id == mine.id), None), timeout=30)
            wait_for(lambda: view.renders >= 2, timeout=30)
            time.sleep(1.5)
            c = _centre(frame.screenshot())
            assert np.abs(c - 255).mean() > 5 and c.std() > 3, "the viewer embedded through the page's port is blank"
            save_screenshot(page.screenshot(full_page=True), tmp_path, "app_page.png")
            page.get_by_text("Iteration").first.wait_for(timeout=10000)  # the status is re-rendered every second
            # a reload keeps control of the run (the owner token lives in the browser's storage), and
            # brings back its prompt and settings
            page.reload()
            page.get_by_text("Running").first.wait_for(timeout=30000)
            page.get_by_text("a red cube").first.wait_for(timeout=30000)
            wait_for(lambda: page.get_by_label("Prompt", exact=True).input_value() == "a red cube", timeout=15)
            page.locator("#settings").get_by_text("Settings").first.click()
            wait_for(lambda: page.get_by_label("Steps", exact=True).input_value() == "1777", timeout=15)
            page.get_by_role("button", name="Stop").click()
            page.get_by_text("Stopped").first.wait_for(timeout=30000)
        finally:
            browser.close()


def test_crashed_run_reports_and_server_keeps_running(app, clients, tiny_prior_dir):
    a, _ = clients
    for r in list(app.manager.runs.values()):  # a long run a previous test left (if it failed)
        if r.status in ("running", "paused"):
            with contextlib.suppress(RunError):  # it may end on its own meanwhile
                app.manager.stop(r.owner, r.id)
    wait_for(lambda: not any(r.status in ("running", "paused") for r in app.manager.runs.values()), timeout=30)
    generate(a, "a red cube", 10, tiny_prior_dir, gmodel="/nonexistent/prior")
    i = wait_for(lambda: (lambda i: i if i["status"] == "failed" else None)(info(a)), timeout=30)
    assert i["message"]
    status = a.predict(api_name="/poll")[0]
    assert "Failed" in status
    generate(a, "a red cube", 3, tiny_prior_dir)  # the server still takes runs
    wait_for(lambda: info(a)["status"] == "done", timeout=30)


def test_viewer_renders_a_snapshot_not_the_live_scene(fast_config):
    """The viewer renders a copy of the scene taken under the trainer's lock, so its renders do
    not hold training up; the copy is refreshed in place and then matches the live scene."""
    import math as m

    import viser.transforms as tf

    from app.viewer import Viewer, ViewSettings
    from dreamfusion.cameras import make_cameras
    from dreamfusion.export import to_uint8
    from dreamfusion.trainer import Trainer

    trainer = Trainer(fast_config, "a red cube")
    trainer.run(3)
    cams = make_cameras(30.0, 20.0, 1.9, 1.1)
    c2w = cams.c2w[0].numpy().astype(np.float64)
    wxyz = tf.SO3.from_matrix(np.stack([c2w[:, 0], -c2w[:, 1], -c2w[:, 2]], axis=1)).wxyz
    fov = 2 * m.atan(0.5 / float(cams.focal[0]))
    settings = ViewSettings()

    def live():
        return to_uint8(trainer.render_views(cams, settings.lights(), size=32)[0])

    shadow = trainer.snapshot()
    before = Viewer.render(shadow, c2w[:, 3], wxyz, fov, 1.0, 32, settings)
    assert np.abs(before.astype(int) - live().astype(int)).max() <= 1
    trainer.field.density_grid.data.add_(0.5)  # the live scene changes; the snapshot does not
    assert np.array_equal(Viewer.render(shadow, c2w[:, 3], wxyz, fov, 1.0, 32, settings), before)
    again = trainer.snapshot(shadow)
    assert again is shadow
    after = Viewer.render(shadow, c2w[:, 3], wxyz, fov, 1.0, 32, settings)
    assert np.abs(after.astype(int) - live().astype(int)).max() <= 1 and not np.array_equal(after, before)


def test_preview_is_enlarged_by_whole_pixels():
    from app.interface import upscale

    img = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    big = upscale(img)
    assert big.shape == (256, 256, 3)
    assert np.array_equal(big[::4, ::4], img) and np.array_equal(big[3::4, 3::4], img)
    assert upscale(None) is None and upscale(big) is big


def test_export_and_finished_result_show_the_same_files():
    from app.interface import result_outputs

    exports = {"ply": Path("/r/mesh.ply"), "obj": Path("/r/mesh.obj"), "video": Path("/r/turntable.mp4")}
    files, mesh, video = result_outputs(exports)
    assert files == ["/r/mesh.ply", "/r/mesh.obj", "/r/turntable.mp4"]
    assert mesh == "/r/mesh.obj" and video == "/r/turntable.mp4"  # obj before ply, as the 3D view prefers
    files, mesh, video = result_outputs({"glb": "/r/m.glb", "obj": "/r/m.obj"}, missing="skip")
    assert mesh == "/r/m.glb" and video == "skip" and files == ["/r/m.glb", "/r/m.obj"]
    assert result_outputs({}, missing="skip") == ([], "skip", "skip")


def test_a_page_that_generated_before_its_token_arrived_keeps_its_run(tmp_path, tiny_prior_dir):
    """Generate pressed before the page's token reached it: the run belongs to the page's session
    until the page's first call with its token, which hands it to the browser."""
    from types import SimpleNamespace

    from app.interface import _owner
    from app.jobs import RunManager

    manager = RunManager(tmp_path, {"render_size": 32, "views": 1, "field": {"resolution": 24}, "guidance": {"model": str(tiny_prior_dir)}},
                         max_concurrent=0)
    try:
        page, other = SimpleNamespace(session_hash="page-session"), SimpleNamespace(session_hash="other-session")
        early = _owner(manager, None, page)
        run = manager.submit(early, "a red cube", steps=3)
        assert manager.latest_of("browser:" + "t" * 20) is None
        owner = _owner(manager, "t" * 20, page)  # the page's next poll, now with its token
        assert owner == "browser:" + "t" * 20 and manager.latest_of(owner) is run and run.owner == owner
        assert _owner(manager, "u" * 20, other) != owner and manager.latest_of(_owner(manager, None, other)) is None
        with pytest.raises(Exception, match="of yours"):
            manager.stop(_owner(manager, "u" * 20, other), run.id)
    finally:
        manager.shutdown()


# ----------------------------------------------------------------------------- a first-time visitor (issue 12)


@pytest.fixture(scope="module")
def quick_app(tmp_path_factory):
    """The app with the shipped prior (its vocabulary is what the note checks) and short runs."""
    from app import create_app

    overrides = {"steps": 8, "render_size": 32, "views": 1, "preview_every": 2, "field": {"resolution": 24}}
    handle = create_app(tmp_path_factory.mktemp("quick"), overrides, viewer_port=free_port(), max_concurrent=1,
                        viewer_kwargs={"full_size": 64, "low_size": 32},
                        export_defaults={"mesh_resolution": 32, "video_frames": 8, "video_size": 64})
    handle.launch(port=free_port())
    assert handle.manager.wait_ready() == []
    yield handle
    handle.close()


def _toasts(page) -> str:
    return " ".join(t.inner_text() for t in page.locator(".toast-body").all())


def test_first_visit_examples_vocabulary_note_and_result_at_once(quick_app, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium")
    manager = quick_app.manager
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(quick_app.url)
            page.get_by_text("The built-in prior knows 16 simple objects").wait_for(timeout=30000)
            # an example fills the prompt and runs it
            page.locator("#examples").get_by_text("a blue torus", exact=True).click()
            prompt = page.get_by_label("Prompt", exact=True)
            wait_for(lambda: prompt.input_value() == "a blue torus", timeout=15)  # the click fills the box (not at once on a busy machine)
            run = wait_for(lambda: next((r for r in manager.runs.values() if r.prompt == "a blue torus"), None), timeout=30)
            wait_for(lambda: run.status == "done", timeout=120)
            # the finished object at once: its mesh in the 3D view and its turntable, no Export click
            page.locator("#result-mesh canvas").first.wait_for(timeout=30000)
            wait_for(lambda: "turntable" in (page.locator("#result-video video").first.get_attribute("src") or ""), timeout=30)
            assert "mesh.glb" in page.locator("#result-mesh").inner_html()
            downloads = page.locator("#downloads").inner_text().replace("\n", "")
            assert "mesh.glb" in downloads and "turntable.mp4" in downloads  # offered without an Export
            # and the gallery lists it (its thumbnail, sent when the gallery's version changes)
            thumb = page.locator("#gallery img").first
            thumb.wait_for(timeout=30000)
            assert "a blue torus" in page.locator("#gallery").inner_html()
            # the thumbnail is shown whole: the image lies inside the gallery (one thumbnail stretched to the
            # page's width in a 200 px high gallery showed only its white top)
            thumb.scroll_into_view_if_needed()  # (loaded lazily)
            wait_for(lambda: thumb.evaluate("e => e.complete && e.naturalWidth > 0"), timeout=15)
            assert thumb.evaluate("e => getComputedStyle(e).objectFit") == "contain"
            box, outer = thumb.bounding_box(), page.locator("#gallery").bounding_box()
            assert 64 <= box["height"] and box["y"] >= outer["y"] and box["y"] + box["height"] <= outer["y"] + outer["height"]
            assert box["x"] >= outer["x"] and box["x"] + box["width"] <= outer["x"] + outer["width"]
            assert _toasts(page) == ""  # a known prompt: no note
            save_screenshot(page.screenshot(full_page=True), tmp_path, "finished.png")
            # Refine a finished run: the prompt box follows the new prompt, the refine box empties
            page.get_by_label("Refine: new prompt for the running scene").fill("a green torus")
            page.get_by_label("Extra steps").fill("4")
            page.get_by_role("button", name="Refine").click()
            wait_for(lambda: prompt.input_value() == "a green torus", timeout=30)
            wait_for(lambda: page.get_by_label("Refine: new prompt for the running scene").input_value() == "", timeout=10)
            wait_for(lambda: run.status == "done" and run.step == 12 and run.prompt == "a green torus", timeout=120)
            # a paraphrase: no note either
            for text, note_expected in (("a cube painted red", False), ("a DSLR photo of a squirrel", True)):
                page.get_by_label("Prompt", exact=True).fill(text)
                page.get_by_role("button", name="Generate").click()
                r = wait_for(lambda t=text: next((r for r in manager.runs.values() if r.prompt == t), None), timeout=30)
                if note_expected:
                    page.get_by_text("is far from all of them").first.wait_for(timeout=15000)
                    assert "squirrel" in _toasts(page) and "nearest" in _toasts(page)
                else:
                    time.sleep(2.0)
                    assert "far from all of them" not in _toasts(page)
                wait_for(lambda r=r: r.status == "done", timeout=120)
        finally:
            browser.close()


def test_viewer_clients_toggle_their_own_frustums(quick_app, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium")
    manager = quick_app.manager
    viewer = quick_app.viewer
    run = manager.submit("browser:" + "f" * 20, "a red cube", steps=3000)
    key = manager.viewer_key("browser:" + "f" * 20)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                pages = [browser.new_page(viewport={"width": 900, "height": 640}) for _ in range(2)]
                for page in pages:  # the same visitor in two tabs: both follow the run
                    page.goto(quick_app.viewer_proxy_url + f"k/{key}/")
                views = wait_for(lambda: list(viewer.clients.values()) if len(viewer.clients) == 2 else None, timeout=30)
                wait_for(lambda: all(len(v.frustums) > 0 and v.frustums[0].visible for v in views), timeout=30)
                # one visitor unticks "Training cameras" in its own browser (which viewer client
                # is which page is not known: the websockets connect in either order)
                box = pages[0].get_by_text("Training cameras").first
                box.wait_for(timeout=30000)
                box.click()
                first = wait_for(lambda: next((v for v in views if not v.frustums_visible), None), timeout=10)
                other = next(v for v in views if v is not first)
                time.sleep(1.5)  # training moves the frustums meanwhile
                assert not any(h.visible for h in first.frustums)
                assert other.frustums_visible and any(h.visible for h in other.frustums)
            finally:
                browser.close()
    finally:
        manager.stop("browser:" + "f" * 20)
        wait_for(lambda: run.status in ("stopped", "done"), timeout=60)



@pytest.fixture
def bare_viewer(tmp_path):
    """A real Viewer (viser server, no browser) and a maker of its clients' views, whose scene is
    the server's own (real handles)."""
    from types import SimpleNamespace

    from app.jobs import RunManager
    from app.viewer import ClientView, Viewer

    viewer = Viewer(RunManager(tmp_path, max_concurrent=0), port=free_port())
    try:
        yield viewer, lambda client_id: ClientView(SimpleNamespace(scene=viewer.server.scene, client_id=client_id))
    finally:
        viewer.stop()


def _training_poses(n: int) -> list:
    """``n`` (c2w, focal) pairs 360 / n degrees apart, as Trainer.training_cameras gives them."""
    import torch

    from dreamfusion.cameras import make_cameras

    cams = make_cameras(torch.arange(float(n)) * (360.0 / n), 20.0, 1.9, 1.2)
    return [(cams.c2w[i], float(cams.focal[i])) for i in range(n)]


def test_a_visitor_leaving_mid_update_does_not_cost_the_others_their_frustums(bare_viewer, capsys):
    """show_training_cameras places frustums in every visitor's scene; a visitor whose handles
    viser has already removed (it left while the update ran) raises on assignment, and the
    visitors after it still get theirs. Real viser handles on a real server (no browser)."""
    viewer, client_view = bare_viewer
    gone = client_view(1)
    gone.frustums.append(viewer.server.scene.add_camera_frustum("/gone/0", fov=1.0, aspect=1.0))
    gone.frustums[0].remove()
    with pytest.raises(Exception, match="removed"):  # what viser does with a removed handle
        gone.frustums[0].position = (0.0, 0.0, 1.0)
    staying = client_view(2)
    viewer.clients = {1: gone, 2: staying}
    poses = _training_poses(2)
    viewer.show_training_cameras(poses)
    assert len(staying.frustums) == 2 and all(h.visible for h in staying.frustums)
    assert np.allclose(staying.frustums[1].position, poses[1][0][:3, 3].numpy(), atol=1e-5)
    assert "not shown to client 1" in capsys.readouterr().out  # the one left out is reported


def test_frustums_placed_from_two_threads_at_once_stay_one_live_set(bare_viewer, capsys):
    """The frustum thread and a connecting client place the same client's frustums at the same
    time (the race that left a page's viewer without renders): each client's placements take
    turns, so it ends with one live handle per pose and nothing fails. Real viser handles."""
    import threading

    viewer, client_view = bare_viewer
    view = client_view(1)
    poses = _training_poses(6)

    def place():
        for _ in range(20):
            viewer._place_frustums(view, poses)

    threads = [threading.Thread(target=place) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "not shown" not in capsys.readouterr().out  # no placement failed
    assert len(view.frustums) == 6
    for h in view.frustums:  # every handle kept is live: assigning to it works
        h.visible = True


def test_sigterm_ends_the_app_and_its_workers_when_nobody_reads_its_output(tiny_prior_dir, tmp_path):
    """``python -m app`` under a supervisor that has stopped reading its output (the pipe closed):
    SIGTERM still shuts it down cleanly, exit status 0, its worker processes gone with it. (Before,
    the shutdown message met the broken pipe and the app died with a traceback before closing.)"""
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DREAMFUSION_MODEL=str(tiny_prior_dir), PYTHONPATH=str(repo))
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(free_port()), "--no-viewer", "--runs-dir", "runs"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "DreamFusion app" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the app ended before it was ready"
        assert "DreamFusion app" in line
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the app's worker processes"
        proc.stdout.close()  # nobody reads any more
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: not any(_running(pid) for pid in children), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _running(pid: str) -> bool:
    """A process that exists and is not a zombie (one that has ended but not been reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
