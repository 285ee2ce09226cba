"""The Gradio page: prompt and settings, Generate / Pause / Resume / Stop, progress, a live loss
plot, the latest training render, Refine (change the prompt of the running scene), exports, a 3D
view of the exported mesh, the live viser viewer and a gallery of this server's finished runs."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import html  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dreamfusion.config import GUIDANCES, USER_GUIDANCES  # noqa: E402

from .jobs import RunError, RunManager  # noqa: E402
from .proxy import VIEWER_PAGE, add_viewer_proxy  # noqa: E402
from .viewer import Viewer  # noqa: E402

EXPORT_CHOICES = ["glb", "obj", "ply", "video"]
#: the page's 3D view shows the first of these that a run has exported
MESH_VIEW_ORDER = ("glb", "obj", "ply")


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
        return owner
    return session


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
    run = manager.latest_of(owner)
    if run is None:
        return {"run": None, "status": "none"}
    return {"run": run.id, "status": run.status, "prompt": run.prompt, "step": run.step, "total_steps": run.total_steps,
            "its": round(run.its(), 3), "eta_s": None if run.eta() is None else round(run.eta(), 1),
            "queue_position": manager.queue_position(run), "start_in_s": manager.estimated_start(run), "message": run.message,
            "prompts": run.prompts, "preview": run.preview is not None,
            "exports": {k: str(v) for k, v in run.exports.items()}}


def status_markdown(info: dict) -> str:
    if info["run"] is None:
        return "No run yet: enter a prompt and press **Generate**."
    s = info["status"]
    head = f"**{s.capitalize()}** · run `{info['run']}` · *{html.escape(info['prompt'])}*"
    if s == "queued":
        start = info.get("start_in_s")
        when = f" · starts in about {_fmt_eta(start)}" if start is not None else ""
        return head + f"\n\nWaiting in the queue: position **{info['queue_position']}**{when}."
    line = f"Iteration **{info['step']} / {info['total_steps']}**"
    if s == "running":
        line += f" · {info['its']:.2f} it/s · ETA {_fmt_eta(info['eta_s'])}"
    msg = f"\n\n{html.escape(info['message'])}" if info.get("message") else ""
    return head + "\n\n" + line + msg


#: prompts that come out recognisable with the shipped prior (README quality table; white objects do not yet)
EXAMPLES = ["a blue torus", "a red mushroom", "a tree", "an orange cylinder", "a yellow cone", "a hamburger"]
#: a refinement inside the world (the paper's Figure 4): the same scene, a new colour, then a new object
REFINE_EXAMPLES = [["a blue cube", 600], ["a green cylinder", 800]]
PRIOR_NOTE = ("The built-in prior knows 16 simple objects (cube, sphere, cylinder, cone, torus, capsule, pyramid, mug, mushroom, "
              "table, chair, house, dumbbell, snowman, tree, hamburger) in 12 colours, and combinations it never saw "
              "(a blue torus works). Open-ended prompts need Stable Diffusion (a GPU and its weights): choose it in Settings.")
#: points of the running mean drawn over the loss
SMOOTHING = 25


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


def build_blocks(manager: RunManager, viewer_url: str | None = None) -> gr.Blocks:
    d = manager.defaults()
    with gr.Blocks(title="DreamFusion") as demo:
        gr.Markdown("# DreamFusion: text to 3D\nOptimise a 3D scene so that its renders look like your prompt to a "
                    "diffusion prior (Score Distillation Sampling). Runs train one at a time on this server; others wait in a queue.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="a red cube", lines=1)
                gr.Markdown(PRIOR_NOTE, elem_id="prior-note")
                examples = gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Examples: click one to generate it", api_name=False,
                                       examples_per_page=len(EXAMPLES), elem_id="examples")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary")
                    pause_btn = gr.Button("Pause")
                    resume_btn = gr.Button("Resume")
                    stop_btn = gr.Button("Stop", variant="stop")
                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        steps = gr.Number(label="Steps", value=d["steps"], precision=0, minimum=1)
                        seed = gr.Number(label="Seed", value=d["seed"], precision=0, minimum=0)
                        render_size = gr.Number(label="Resolution (training renders, px)", value=d["render_size"], precision=0)
                    with gr.Row():
                        guidance_name = gr.Dropdown(list(USER_GUIDANCES), value=d["guidance_name"], label="Guidance")
                        guidance_model = gr.Textbox(value=d["guidance_model"], label="Guidance model (folder or hub id; empty: default)")
                        guidance_scale = gr.Number(label="Guidance weight", value=d["guidance_scale"], minimum=0)
                status = gr.Markdown("No run yet: enter a prompt and press **Generate**.")
                with gr.Row():
                    refine_prompt = gr.Textbox(label="Refine: new prompt for the running scene", placeholder="a blue cube", scale=3)
                    refine_steps = gr.Number(label="Extra steps", value=0, precision=0, minimum=0, scale=1)
                    refine_btn = gr.Button("Refine", scale=1)
                gr.Examples(REFINE_EXAMPLES, inputs=[refine_prompt, refine_steps], api_name=False, elem_id="refine-examples",
                            label="Refine examples (the paper's Figure 4: the same scene, a new prompt): click one, then Refine")
                with gr.Row():
                    export_formats = gr.CheckboxGroup(EXPORT_CHOICES, value=["glb"], label="Export formats")
                    export_btn = gr.Button("Export")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
            with gr.Column(scale=2):
                preview = gr.Image(label="Latest training render", type="numpy", interactive=False, height=256)
                loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Guidance loss (raw and running mean)", height=220)
        with gr.Row():
            model3d = gr.Model3D(label="Exported mesh", height=360, elem_id="result-mesh")
            video = gr.Video(label="Turntable", interactive=False, height=360, elem_id="result-video")
        if viewer_url:
            with gr.Accordion("Live 3D viewer (viser)", open=True):
                gr.Markdown("Drag to orbit; relight and change the shading in the viewer's panel (this changes what you see, not the "
                            f"training). Open it in its own tab: [{viewer_url}]({viewer_url})")
                gr.HTML(f'<iframe src="{html.escape(viewer_url)}" style="width:100%;height:520px;border:0" allow="fullscreen"></iframe>')
        gallery = gr.Gallery(label="Finished runs on this server", columns=6, height=200, object_fit="contain", elem_id="gallery")
        with gr.Accordion("Details", open=False):
            info_json = gr.JSON(label="Run")
        gallery_version = gr.State(-1)
        shown_result = gr.State("")  # which finished run's files this page shows already
        owner_token = gr.BrowserState(None, storage_key="dreamfusion-owner")
        timer = gr.Timer(1.0)

        # ---------------------------------------------------------------- handlers
        def generate(p: str, n_steps: int | None, s: int | None, gname: str | None, gmodel: str | None, gscale: float | None,
                     res: int | None, token: object, request: gr.Request):
            owner = _owner(manager, token, request)
            try:
                run = manager.submit(owner, p, steps=n_steps, seed=s, guidance_name=gname, guidance_model=gmodel,
                                     guidance_scale=gscale, render_size=res)
            except RunError as exc:
                raise gr.Error(str(exc)) from None
            note = manager.vocabulary_note(run.cfg, run.prompt)
            if note:  # the run goes on; the visitor knows why a squirrel comes out as a blob
                gr.Warning(note[0].upper() + note[1:], duration=20)
            return status_markdown(run_info(manager, owner)), run.id

        def control(action: str):
            def fn(run_id: str, token: object, request: gr.Request):
                owner = _owner(manager, token, request)
                try:
                    getattr(manager, action)(owner, run_id or None)
                except RunError as exc:
                    raise gr.Error(str(exc)) from None
                return status_markdown(run_info(manager, owner))
            return fn

        def refine(p: str, extra: int | None, token: object, request: gr.Request):
            owner = _owner(manager, token, request)
            try:
                manager.refine(owner, p, extra or 0)
            except RunError as exc:
                raise gr.Error(str(exc)) from None
            gr.Info("prompt changed: optimisation continues from the current scene")
            return status_markdown(run_info(manager, owner))

        def export(formats: list[str] | None, token: object, request: gr.Request):
            owner = _owner(manager, token, request)
            try:
                written = manager.export(owner, formats)
            except RunError as exc:
                raise gr.Error(str(exc)) from None
            return result_outputs(written)

        def poll(shown_result: str, token: object, request: gr.Request):
            """What changes every second (status, loss, latest render) and two keys: the gallery's
            version and the finished result to show. The gallery and the result files are sent
            by those keys' change events, only when they change: every output a poll skips costs
            Gradio a component rebuilt with its JSON schema (profiled: half the page server's CPU
            with 8 clients polling)."""
            owner = _owner(manager, token, request)
            info = run_info(manager, owner)
            run = manager.latest_of(owner)
            plot = gr.skip()  # an empty frame would leave the chart with a broken colour scale: send data only
            img = None
            if run is not None:
                if run.losses:
                    plot = smoothed_losses(list(run.losses))
                img = upscale(run.preview)
                if run.status in ("done", "stopped") and run.exports:
                    # the finished object at once: its mesh in the 3D view and its turntable, no Export click
                    shown_result = f"{run.id}:{run.step}"
            return status_markdown(info), info, plot, img, manager.version, shown_result

        def show_gallery():
            return [(m["preview"], f"{m['prompt']} ({m['status']}, {m['step']} steps)") for m in manager.finished()[:30]]

        def show_result(key: str, token: object, request: gr.Request):
            run = manager.latest_of(_owner(manager, token, request))
            if not key or run is None or not run.exports or not key.startswith(f"{run.id}:"):
                return gr.skip(), gr.skip(), gr.skip()
            return result_outputs(run.exports, missing=gr.skip())

        run_id_box = gr.Textbox(visible=False, label="run id")
        # another prior: its own default weight (one registry for the app and the command line)
        guidance_name.change(lambda name: GUIDANCES[name].guidance_scale if name in GUIDANCES else gr.update(), [guidance_name], [guidance_scale])
        gen_inputs = [prompt, steps, seed, guidance_name, guidance_model, guidance_scale, render_size, owner_token]
        examples.load_input_event.then(generate, gen_inputs, [status, run_id_box], api_name=False, concurrency_limit=None)
        generate_btn.click(generate, gen_inputs, [status, run_id_box],
                           api_name="generate", concurrency_limit=None)
        for btn, action in ((pause_btn, "pause"), (resume_btn, "resume"), (stop_btn, "stop")):
            btn.click(control(action), [run_id_box, owner_token], [status], api_name=action, concurrency_limit=None)
        refine_btn.click(refine, [refine_prompt, refine_steps, owner_token], [status], api_name="refine", concurrency_limit=None)
        export_btn.click(export, [export_formats, owner_token], [files, model3d, video], api_name="export", concurrency_limit=2)
        outs = [status, info_json, loss_plot, preview, gallery_version, shown_result]
        timer.tick(poll, [shown_result, owner_token], outs, api_name="poll", concurrency_limit=None, show_progress="hidden")
        gallery_version.change(show_gallery, None, [gallery], api_name=False, concurrency_limit=None, show_progress="hidden")
        shown_result.change(show_result, [shown_result, owner_token], [files, model3d, video], api_name=False,
                            concurrency_limit=None, show_progress="hidden")

        def init_owner(token: object):
            return token if valid_token(token) else new_owner_token()

        demo.load(init_owner, [owner_token], [owner_token], api_name=False, concurrency_limit=None).then(
            poll, [shown_result, owner_token], outs, api_name=False, concurrency_limit=None)
    return demo


@dataclass
class AppHandle:
    demo: gr.Blocks
    manager: RunManager
    viewer: Viewer | None
    host: str
    url: str | None = None
    port: int | None = None
    server: object = None
    thread: threading.Thread | None = None

    def launch(self, port: int = 7860, quiet: bool = True) -> str:
        """Serve the page and, under ``/viewer/``, the live viewer (one port, as a Space needs)
        from a uvicorn server in a background thread. Returns the page's URL."""
        import fastapi
        import uvicorn

        app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        if self.viewer is not None:
            add_viewer_proxy(app, self.viewer.port)
        self.demo.queue(default_concurrency_limit=None)
        gr.mount_gradio_app(app, self.demo, path="", server_name=self.host, server_port=port,
                            allowed_paths=[str(self.manager.runs_dir)], ssr_mode=False)
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


def create_app(runs_dir: str | Path = "runs/app", config_overrides: dict | None = None, host: str = "127.0.0.1", viewer_port: int | None = 8080,
               max_concurrent: int = 1, max_runs_kept: int = 20, threads: int = 1, viewer_kwargs: dict | None = None,
               export_defaults: dict | None = None, viewer_public_url: str | None = None, preload: bool = True) -> AppHandle:
    """Build the run manager, the viser viewer (unless ``viewer_port`` is None) and the page.
    ``preload``: load the default prior now (shared by every run of the process), so the first
    visitor does not wait for it; a prior that cannot load is reported when a run asks for it."""
    manager = RunManager(runs_dir, config_overrides, max_concurrent=max_concurrent, max_runs_kept=max_runs_kept, threads=threads,
                         export_defaults=export_defaults)
    if preload:
        manager.preload()
    viewer = Viewer(manager, host=host, port=viewer_port, **(viewer_kwargs or {})) if viewer_port is not None else None
    # the page embeds the viewer through its own port (relative to the page: works behind a
    # Space's single port and any reverse proxy); it is also on its own port locally
    url = viewer_public_url or (VIEWER_PAGE if viewer else None)
    demo = build_blocks(manager, url)
    return AppHandle(demo, manager, viewer, host)
