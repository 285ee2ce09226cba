"""The Gradio page: prompt and settings, Generate / Pause / Resume / Stop, progress, a live loss
plot, the latest training render, Refine (change the prompt of the running scene), exports, a 3D
view of the exported mesh, the visitor's own live viser viewer and a gallery of finished runs.

Everything a visitor typed (a prompt) or a run reported (a message) is shown as text: HTML
escaped in every component that renders HTML or markdown, never a link."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Gradio's queue rebuilds a pandas table of its last 10,000 events after every event, for a
# monitoring dashboard this app never enables: with every visitor polling each second that was a
# fifth of the page process's CPU under load (py-spy, 8 clients). Keep 100 events and never rebuild.
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "100")
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**12))

import html  # noqa: E402
import ipaddress  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dreamfusion.config import GUIDANCES  # noqa: E402

from .jobs import RunError, RunManager  # noqa: E402
from .proxy import VIEWER_PAGE, add_viewer_proxy  # noqa: E402
from .viewer import Viewer  # noqa: E402

#: the Export formats: (label, value); "textured_glb" is mesh_textured.glb (UVs, colours in a PNG texture)
EXPORT_CHOICES = [("GLB", "glb"), ("GLB, textured", "textured_glb"), ("OBJ", "obj"), ("PLY", "ply"), ("turntable video", "video")]
#: the page's 3D view shows the first of these that a run has exported: the textured GLB's material
#: is unlit (flat albedo, for engines that light it themselves), which in the view is a flat
#: silhouette, so the lit vertex-coloured GLB comes first where both were written
MESH_VIEW_ORDER = ("glb", "textured_glb", "obj", "ply")


def result_outputs(exports: dict[str, Path | str], missing: object = None) -> tuple[list[str], object, object]:
    """What the page shows of a run's exported files: (every file for download, the mesh for the
    3D view, the turntable video), ``missing`` where there is no mesh or no video. The one
    definition for the Export button and the finished result shown without a click."""
    mesh = next((str(exports[k]) for k in MESH_VIEW_ORDER if k in exports), missing)
    video = str(exports["video"]) if "video" in exports else missing
    return [str(p) for p in exports.values()], mesh, video


#: what a browser keeps in its localStorage to stay the owner of its runs across reloads
OWNER_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")


def new_owner_token() -> str:
    return secrets.token_urlsafe(24)


def valid_token(token: object) -> bool:
    return isinstance(token, str) and OWNER_TOKEN.fullmatch(token) is not None


def text(value: object) -> str:
    """A visitor's or a run's text for a component that renders HTML (a status, a toast): escaped."""
    return html.escape(str(value), quote=False)


def _owner(manager: RunManager, token: object, request: gr.Request | None) -> str:
    """Who is asking: the browser's owner token (kept in its localStorage, so a reload keeps
    control of its run), else the Gradio session (an API client that sends no token).

    A page can act before its token has reached it (a Generate right after loading): such runs
    belong to the page's session until its first call with the token, which hands them over."""
    if request is None or not getattr(request, "session_hash", None):
        raise gr.Error("no session: reload the page")
    session = "session:" + request.session_hash
    if valid_token(token):
        owner = "browser:" + token
        manager.adopt(session, owner)
    else:
        owner = session
    manager.touch(owner)
    return owner


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def upscale(image: np.ndarray | None, size: int = 256) -> np.ndarray | None:
    """A small (H, W, 3) render enlarged by whole pixels (nearest) to about ``size``: the page
    shows the render the prior saw, not a blur of it."""
    if image is None or image.shape[0] >= size:
        return image
    k = max(1, size // image.shape[0])
    return image.repeat(k, axis=0).repeat(k, axis=1)


def run_info(manager: RunManager, owner: str) -> dict:
    """What the page (and an API client's poll) knows of the caller's latest run: no server path,
    exported files by name only."""
    run = manager.latest_of(owner)
    if run is None:
        return {"run": None, "status": "none"}
    return {"run": run.id, "status": run.status, "prompt": run.prompt, "step": run.step, "total_steps": run.total_steps,
            "its": round(run.its(), 3), "eta_s": None if run.eta() is None else round(run.eta(), 1),
            "queue_position": manager.queue_position(run), "start_in_s": manager.estimated_start(run), "message": run.message,
            "saving": run.finishing, "prompts": run.prompts, "preview": run.preview is not None,
            "exports": {k: Path(v).name for k, v in run.exports.items()}}


def status_html(info: dict) -> str:
    """The status line: the run's state and progress, its prompt and message as text."""
    if info["run"] is None:
        return "<p>No run yet: enter a prompt and press <b>Generate</b>.</p>"
    s = info["status"]
    head = f"<b>{s.capitalize()}</b> · run <code>{text(info['run'])}</code> · <i>{text(info['prompt'])}</i>"
    if s == "queued":
        start = info.get("start_in_s")
        when = f" · starts in about {_fmt_eta(start)}" if start is not None else ""
        return f"<p>{head}</p><p>Waiting in the queue: position <b>{info['queue_position']}</b>{when}.</p>"
    line = f"Iteration <b>{info['step']} / {info['total_steps']}</b>"
    if s == "running" and info.get("saving"):
        line += " · saving the mesh and the turntable…"
    elif s == "running":
        line += f" · {info['its']:.2f} it/s · ETA {_fmt_eta(info['eta_s'])}"
    msg = f"<p>{text(info['message'])}</p>" if info.get("message") else ""
    return f"<p>{head}</p><p>{line}</p>{msg}"


def prior_note() -> str:
    from dreamfusion.prior.world import COLOUR_NAMES, NOUNS

    return ("The built-in prior knows 16 simple objects (" + ", ".join(NOUNS) + f") in {len(COLOUR_NAMES)} colours ("
            + ", ".join(COLOUR_NAMES) + "), and combinations it never saw (a blue torus works). It reads about the first "
            "15 words of a prompt (24 tokens, the view phrase included). Open-ended prompts need Stable Diffusion "
            "(a GPU and its weights), where this server offers it under Settings → Guidance.")


#: prompts that come out recognisable with the shipped prior (README quality table)
EXAMPLES = ["a blue torus", "a red mushroom", "a tree", "an orange cylinder", "a yellow cone", "a hamburger"]
#: a refinement inside the world (the paper's Figure 4): the same scene, a new colour, then a new object
REFINE_EXAMPLES = [["a blue cube", 600], ["a green cylinder", 800]]
#: points of the running mean drawn over the loss
SMOOTHING = 25
#: seconds between two loss plots sent to a page while its run trains
PLOT_EVERY = 3.0


def smoothed_losses(points: list[tuple[int, float]], window: int = SMOOTHING, limit: int = 600) -> pd.DataFrame:
    """The raw loss points and their running mean (the mean of the last ``window`` points), at
    most about ``limit`` of each: a frame with columns step, loss, series ('raw' or 'mean')."""
    if not points:
        return pd.DataFrame({"step": [], "loss": [], "series": []})
    steps = np.array([p[0] for p in points], dtype=float)
    raw = np.array([p[1] for p in points], dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(raw)])
    idx = np.arange(len(raw))
    start = np.maximum(0, idx - window + 1)
    mean = (csum[idx + 1] - csum[start]) / (idx + 1 - start)
    keep = np.unique(np.concatenate([np.arange(0, len(raw), max(1, len(raw) // limit + 1)), [len(raw) - 1]]))
    return pd.concat([pd.DataFrame({"step": steps[keep], "loss": raw[keep], "series": "raw"}),
                      pd.DataFrame({"step": steps[keep], "loss": mean[keep], "series": f"mean of {window}"})], ignore_index=True)


#: the gallery shows each thumbnail whole (a square render, not the top of one)
PAGE_CSS = "#gallery img {object-fit: contain !important;}"


def viewer_iframe(src: str) -> str:
    return f'<iframe src="{html.escape(src)}" style="width:100%;height:520px;border:0" allow="fullscreen" title="Live 3D viewer"></iframe>'


def build_blocks(manager: RunManager, viewer_url: str | None = None) -> gr.Blocks:
    d = manager.defaults()
    keyed_viewer = viewer_url == VIEWER_PAGE  # the viewer behind the page's own port follows each visitor's runs
    with gr.Blocks(title="DreamFusion") as demo:
        gr.Markdown("# DreamFusion: text to 3D\nOptimise a 3D scene so that its renders look like your prompt to a "
                    "diffusion prior (Score Distillation Sampling). Runs train a few at a time on this server; others wait in a queue.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="a red cube", lines=1, max_length=500)
                gr.Markdown(prior_note(), elem_id="prior-note")
                examples = gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Examples: click one to generate it", api_name=False,
                                       examples_per_page=len(EXAMPLES), elem_id="examples")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary")
                    pause_btn = gr.Button("Pause")
                    resume_btn = gr.Button("Resume")
                    stop_btn = gr.Button("Stop", variant="stop")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    with gr.Row():
                        steps = gr.Number(label="Steps", value=d["steps"], precision=0, minimum=1, maximum=manager.max_steps)
                        seed = gr.Number(label="Seed", value=d["seed"], precision=0, minimum=0)
                        render_size = gr.Number(label="Resolution (training renders, px)", value=d["render_size"], precision=0)
                    with gr.Row():
                        guidance_name = gr.Dropdown(list(manager.offered_guidances()), value=d["guidance_name"], label="Guidance")
                        guidance_model = gr.Textbox(value=d["guidance_model"], label="Guidance model (folder or hub id; empty: default)",
                                                    visible=not manager.public)
                        guidance_scale = gr.Number(label="Guidance weight", value=d["guidance_scale"], minimum=0)
                status = gr.HTML(status_html({"run": None}), elem_id="status")
                with gr.Row():
                    refine_prompt = gr.Textbox(label="Refine: new prompt for the running scene", placeholder="a blue cube", scale=3, max_length=500)
                    refine_steps = gr.Number(label="Extra steps", value=0, precision=0, minimum=0, scale=1)
                    refine_btn = gr.Button("Refine", scale=1)
                gr.Examples(REFINE_EXAMPLES, inputs=[refine_prompt, refine_steps], api_name=False, elem_id="refine-examples",
                            label="Refine examples (the paper's Figure 4: the same scene, a new prompt): click one, then Refine")
                with gr.Row():
                    export_formats = gr.CheckboxGroup(EXPORT_CHOICES, value=["glb"], label="Export formats")
                    export_btn = gr.Button("Export")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads", visible=False)
            with gr.Column(scale=2):
                preview = gr.Image(label="Latest training render", type="numpy", interactive=False, height=256, visible=False, elem_id="preview")
                loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Guidance loss (raw and running mean)", height=220,
                                        visible=False, elem_id="loss")
        with gr.Row():
            model3d = gr.Model3D(label="Exported mesh", height=360, elem_id="result-mesh", visible="hidden", interactive=False,
                                 clear_color=(1.0, 1.0, 1.0, 1.0))
            video = gr.Video(label="Turntable", interactive=False, height=360, elem_id="result-video", visible=False)
        viewer_frame = None
        if viewer_url:
            with gr.Accordion("Live 3D viewer (viser)", open=True):
                gr.Markdown("Drag to orbit; relight and change the shading in the viewer's panel (this changes what you see, not the "
                            "training). It follows your own run; before you have one it shows the newest finished result.")
                viewer_frame = gr.HTML("" if keyed_viewer else viewer_iframe(viewer_url), elem_id="viewer")
        gallery = gr.Gallery(label="Finished runs on this server", columns=6, fit_columns=False, height=270, object_fit="contain",
                             elem_id="gallery", visible=False, allow_preview=True)
        with gr.Accordion("Details", open=False):
            info_json = gr.JSON(label="Run")
        gallery_version = gr.State(-1)
        shown_result = gr.State("")  # which finished run's files this page shows already
        sent_state = gr.State({})  # which render and which loss points this page has been sent
        owner_token = gr.BrowserState(None, storage_key="dreamfusion-owner")
        timer = gr.Timer(1.0)

        def fail(exc: Exception) -> gr.Error:
            return gr.Error(text(exc), print_exception=False)

        # ---------------------------------------------------------------- handlers
        def generate(p: str, n_steps: int | None, s: int | None, gname: str | None, gmodel: str | None, gscale: float | None,
                     res: int | None, token: object, request: gr.Request):
            owner = _owner(manager, token, request)
            try:
                run = manager.submit(owner, p, steps=n_steps, seed=s, guidance_name=gname, guidance_model=gmodel,
                                     guidance_scale=gscale, render_size=res)
            except RunError as exc:
                raise fail(exc) from None
            note = manager.vocabulary_note(run.cfg, run.prompt)
            if note:  # the run goes on; the visitor knows why a squirrel comes out as a blob
                if "stable-diffusion" in manager.offered_guidances():
                    note += ": choose it under Settings → Guidance"
                gr.Warning(text(note[0].upper() + note[1:] + "."), duration=20)
            return status_html(run_info(manager, owner)), run.id

        def control(action: str):
            def fn(run_id: str, token: object, request: gr.Request):
                owner = _owner(manager, token, request)
                try:
                    getattr(manager, action)(owner, run_id or None)
                except RunError as exc:
                    raise fail(exc) from None
                return status_html(run_info(manager, owner))
            return fn

        def refine(p: str, extra: int | None, token: object, request: gr.Request):
            owner = _owner(manager, token, request)
            try:
                run = manager.refine(owner, p, extra or 0)
            except RunError as exc:
                raise fail(exc) from None
            gr.Info("prompt changed: optimisation continues from the current scene")
            return status_html(run_info(manager, owner)), run.prompt, ""

        def export(formats: list[str] | None, token: object, request: gr.Request):
            owner = _owner(manager, token, request)
            try:
                written = manager.export(owner, formats)
            except RunError as exc:
                raise fail(exc) from None
            return result_outputs(written)

        def reveal(files_: list | None, mesh: object, vid: object):
            """Show the boxes that now hold something (they stay hidden while empty)."""
            return gr.update(visible=bool(files_)), gr.update(visible=bool(mesh)), gr.update(visible=bool(vid))

        def poll(shown_result: str, sent: dict, token: object, request: gr.Request):
            """What changes every second (status, loss, latest render) and two keys: the gallery's
            version and the finished result to show. The gallery and the result files are sent
            by those keys' change events, only when they change; the render only when training made
            a new one, and the loss plot at most every PLOT_EVERY seconds: encoding an image and a
            chart for every poll of every visitor was most of the page process's work."""
            owner = _owner(manager, token, request)
            info = run_info(manager, owner)
            run = manager.latest_of(owner)
            plot = gr.skip()  # an empty frame would leave the chart with a broken colour scale: send data only
            img = gr.skip()
            sent = dict(sent or {})
            if run is not None:
                now = time.time()
                plot_key = [run.id, len(run.losses)]
                if run.losses and plot_key != sent.get("plot") and (now - sent.get("plot_t", 0.0) >= PLOT_EVERY or not run.active):
                    plot = gr.update(value=smoothed_losses(list(run.losses)), visible=True)
                    sent["plot"], sent["plot_t"] = plot_key, now
                preview_key = [run.id, run.preview_step]
                if run.preview is not None and preview_key != sent.get("preview"):
                    img = gr.update(value=upscale(run.preview), visible=True)
                    sent["preview"] = preview_key
                if run.status in ("done", "stopped") and run.exports:
                    # the finished object at once: its mesh in the 3D view and its turntable, no Export click
                    shown_result = f"{run.id}:{run.step}"
            return status_html(info), info, plot, img, manager.version, shown_result, sent

        def show_gallery():
            entries = manager.finished()[:30]
            items = [(m["preview"], f"{m['prompt']} ({m['status']}, {m['step']} steps)") for m in entries]
            return gr.update(value=items, visible=bool(items))

        def show_result(key: str, token: object, request: gr.Request):
            run = manager.latest_of(_owner(manager, token, request))
            if not key or run is None or not run.exports or not key.startswith(f"{run.id}:"):
                return gr.skip(), gr.skip(), gr.skip()
            files_, mesh, vid = result_outputs(run.exports)
            return (gr.update(value=files_, visible=True), gr.update(value=mesh, visible=True) if mesh else gr.skip(),
                    gr.update(value=vid, visible=True) if vid else gr.skip())

        run_id_box = gr.Textbox(visible=False, label="run id")
        # another prior: its own default weight (one registry for the app and the command line)
        guidance_name.change(lambda name: GUIDANCES[name].guidance_scale if name in GUIDANCES else gr.update(), [guidance_name], [guidance_scale],
                             api_name=False)
        gen_inputs = [prompt, steps, seed, guidance_name, guidance_model, guidance_scale, render_size, owner_token]
        examples.load_input_event.then(generate, gen_inputs, [status, run_id_box], api_name=False, concurrency_limit=None)
        generate_btn.click(generate, gen_inputs, [status, run_id_box],
                           api_name="generate", concurrency_limit=None)
        for btn, action in ((pause_btn, "pause"), (resume_btn, "resume"), (stop_btn, "stop")):
            btn.click(control(action), [run_id_box, owner_token], [status], api_name=action, concurrency_limit=None)
        refine_btn.click(refine, [refine_prompt, refine_steps, owner_token], [status, prompt, refine_prompt], api_name="refine",
                         concurrency_limit=None)
        export_btn.click(export, [export_formats, owner_token], [files, model3d, video], api_name="export", concurrency_limit=4).then(
            reveal, [files, model3d, video], [files, model3d, video], api_name=False, show_progress="hidden")
        outs = [status, info_json, loss_plot, preview, gallery_version, shown_result, sent_state]
        timer.tick(poll, [shown_result, sent_state, owner_token], outs, api_name="poll", concurrency_limit=None, show_progress="hidden")
        gallery_version.change(show_gallery, None, [gallery], api_name=False, concurrency_limit=None, show_progress="hidden")
        shown_result.change(show_result, [shown_result, owner_token], [files, model3d, video], api_name=False,
                            concurrency_limit=None, show_progress="hidden")

        def init_page(token: object, request: gr.Request):
            """A new page or a reload: the browser's token (a new one on a first visit), its viewer,
            and the settings of its latest run, so a reload shows what it was doing."""
            token = token if valid_token(token) else new_owner_token()
            owner = _owner(manager, token, request)
            frame = viewer_iframe(f"{VIEWER_PAGE}k/{manager.viewer_key(owner)}/") if keyed_viewer else gr.skip()
            run = manager.latest_of(owner)
            if run is None:
                return (token, frame) + (gr.skip(),) * 7
            c = run.cfg
            model = gr.skip() if manager.public else c.guidance.model
            return (token, frame, run.prompt, c.steps, c.seed, c.guidance.name, model, c.guidance.guidance_scale, c.render_size)

        settings_outputs = [prompt, steps, seed, guidance_name, guidance_model, guidance_scale, render_size]
        frame_out = [viewer_frame] if viewer_frame is not None else []

        def init_outputs(token: object, request: gr.Request):
            out = init_page(token, request)
            return out if viewer_frame is not None else (out[0],) + out[2:]

        demo.load(init_outputs, [owner_token], [owner_token, *frame_out, *settings_outputs], api_name=False, concurrency_limit=None).then(
            poll, [shown_result, sent_state, owner_token], outs, api_name=False, concurrency_limit=None)
    return demo


# ---------------------------------------------------------------------------- who may reach the server


def local_names(host: str) -> set[str]:
    """The names a browser may use for a server bound to ``host``: loopback, and for an address of
    all interfaces (0.0.0.0) this machine's own names and addresses."""
    names = {"localhost", "127.0.0.1", "::1", "[::1]"}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host.lower())
        return names
    hostname = socket.gethostname()
    names |= {hostname.lower(), socket.getfqdn().lower()}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
    except OSError:
        pass
    return names


def host_allowed(header: str, allowed: Iterable[str]) -> bool:
    """Whether a request's ``Host`` header names this server (``*`` in ``allowed``: any name)."""
    allowed = {a.lower() for a in allowed}
    if "*" in allowed:
        return True
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:7860
        name = host[: host.find("]") + 1] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in allowed or name.strip("[]") in allowed:
        return True
    for pattern in allowed:  # a wildcard domain: .hf.space allows any subdomain of it
        if pattern.startswith(".") and (name.endswith(pattern) or name == pattern[1:]):
            return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback and any(a in ("localhost", "127.0.0.1") for a in allowed)
    except ValueError:
        return False


def add_host_check(app: object, allowed: set[str]) -> None:
    """Refuse a request whose ``Host`` is not one of this server's names (DNS rebinding: a page
    elsewhere that resolves its own name to this machine), with one line that says how to allow it."""
    from starlette.responses import PlainTextResponse

    @app.middleware("http")
    async def check_host(request, call_next):  # noqa: ANN001, ANN202 - starlette's middleware signature
        header = request.headers.get("host", "")
        if not host_allowed(header, allowed):
            return PlainTextResponse(f"this server does not answer to the name {header!r}; its operator can allow it with "
                                     "--allowed-hosts (or DREAMFUSION_ALLOWED_HOSTS)", status_code=400)
        return await call_next(request)


@dataclass
class AppHandle:
    demo: gr.Blocks
    manager: RunManager
    viewer: Viewer | None
    host: str
    allowed_hosts: tuple[str, ...] = ()
    url: str | None = None
    port: int | None = None
    server: object = None
    thread: threading.Thread | None = None

    def launch(self, port: int = 7860, quiet: bool = True) -> str:
        """Serve the page and, under ``/viewer/``, the live viewer (one port, as a Space needs)
        from a uvicorn server in a background thread. Returns the page's URL.

        No folder of runs is served: a visitor's files reach only that visitor, as Gradio's copies
        of what the page hands them (under names made of their content's hash)."""
        import fastapi
        import uvicorn

        app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        add_host_check(app, local_names(self.host) | set(self.allowed_hosts))
        if self.viewer is not None:
            add_viewer_proxy(app, self.viewer.port)
        self.demo.queue(default_concurrency_limit=None)
        # no run history: Gradio would record every poll in the browser and offer to copy calls to a hub bucket
        gr.mount_gradio_app(app, self.demo, path="", server_name=self.host, server_port=port, ssr_mode=False, css=PAGE_CSS,
                            run_history=False, footer_links=["api", "gradio", "settings"])
        config = uvicorn.Config(app, host=self.host, port=port, log_level="warning" if quiet else "info", ws="websockets-sansio",
                                ws_max_size=50 * 1024 * 1024)
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # not the main thread: the caller handles Ctrl-C
        errors: list[BaseException] = []

        def serve():
            try:
                server.run()
            except BaseException as exc:  # noqa: BLE001 - reported to launch() below
                errors.append(exc)

        self.thread = threading.Thread(target=serve, name="app-server", daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not server.started:
            if errors or not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"could not start the app on {self.host}:{port} (is the port in use?)")
            time.sleep(0.05)
        self.server, self.port = server, port
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        self.url = f"http://{shown}:{port}/"
        return self.url

    @property
    def viewer_proxy_url(self) -> str | None:
        """The viewer through the page's own port."""
        return None if self.viewer is None or self.url is None else self.url + VIEWER_PAGE

    def close(self) -> None:
        self.manager.shutdown()
        if self.viewer is not None:
            self.viewer.stop()
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(10)
        self.demo.close()


def check_runs_dir(runs_dir: Path) -> Path:
    """The folder of runs must lie in the working directory or the system's temporary folder: Gradio
    hands a visitor only copies of files from there (and serves no folder of runs itself)."""
    import tempfile

    runs_dir = Path(runs_dir).resolve()
    roots = [Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()]
    if not any(runs_dir == r or r in runs_dir.parents for r in roots):
        raise ValueError(f"the runs folder {runs_dir} must be inside the working directory ({roots[0]}) or {roots[1]}: "
                         "start the app from a folder that contains it")
    return runs_dir


def create_app(runs_dir: str | Path = "runs/app", config_overrides: dict | None = None, host: str = "127.0.0.1", viewer_port: int | None = 8080,
               max_concurrent: int | None = None, max_runs_kept: int = 20, threads: int = 1, viewer_kwargs: dict | None = None,
               export_defaults: dict | None = None, viewer_public_url: str | None = None, preload: bool = True, public: bool = False,
               models: dict[str, str] | None = None, max_queue: int | None = 20, allowed_hosts: tuple[str, ...] = (),
               abandon_after: float = 120.0, max_steps: int | None = None, manager_kwargs: dict | None = None) -> AppHandle:
    """Build the run manager (its worker processes load the default prior now, so the first visitor
    does not wait for it), the viser viewer (unless ``viewer_port`` is None) and the page.

    ``public``: a server for strangers (see :class:`~app.jobs.RunManager`); its viewer listens on
    127.0.0.1 only and is reached through the page's port."""
    from .jobs import MAX_STEPS

    runs_dir = check_runs_dir(runs_dir)
    manager = RunManager(runs_dir, config_overrides, max_concurrent=max_concurrent, max_runs_kept=max_runs_kept, threads=threads,
                         export_defaults=export_defaults, preload=preload, public=public, models=models, max_queue=max_queue,
                         abandon_after=abandon_after, max_steps=max_steps or MAX_STEPS, **(manager_kwargs or {}))
    viewer_host = "127.0.0.1" if public else host
    viewer = Viewer(manager, host=viewer_host, port=viewer_port, **(viewer_kwargs or {})) if viewer_port is not None else None
    # the page embeds the viewer through its own port (relative to the page: works behind a
    # Space's single port and any reverse proxy); it is also on its own port locally
    url = viewer_public_url or (VIEWER_PAGE if viewer else None)
    demo = build_blocks(manager, url)
    return AppHandle(demo, manager, viewer, host, tuple(allowed_hosts))
