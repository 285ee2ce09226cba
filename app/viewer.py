"""The live 3D viewer: a viser server that shows a run's scene from each browser's own camera.

Each visitor's viewer follows that visitor's own run (the page puts a key in the viewer's address
that names its owner without giving away the owner's token), or, with none, the newest finished
result: never a stranger's run in progress. Each connected client gets a render thread that
renders its run's scene with the client's camera and sends it as the scene's background image:
low resolution while the camera moves, ``full_size`` once it stops, and, while neither the camera
nor the scene changes, sharper step by step up to the client's canvas (at most ``max_size``).
Renders are rate limited (``min_interval`` per client, and ``scene_interval`` when only the training
progressed). The scene comes from the worker that trains the run (a snapshot of its tensors) or
from a finished run's checkpoint: the viewer never touches training. The relighting and shading
controls change only what this client sees. Everything a visitor typed is shown as text.
"""

from __future__ import annotations

import html
import math
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import viser
import viser.transforms as tf

from dreamfusion.cameras import Cameras, Lights, spherical_to_position
from dreamfusion.export import to_uint8
from dreamfusion.render import Renderer
from dreamfusion.shading import SHADING_MODES

from .jobs import Run, RunManager

#: the viewer's address for one visitor: ``.../k/<key>/`` (the key names whose runs it follows)
KEY_IN_PATH = re.compile(r"/k/([0-9a-f]{16,64})/?$")


#: where a markdown renderer would see the start of a bare link (GFM autolinks: scheme://, www., user@host)
AUTOLINK = re.compile(r"(?<=:)(?=//)|(?<=www)(?=\.)|(?<=@)", re.IGNORECASE)


def markdown_text(text: str) -> str:
    """``text`` for a markdown field that shows it verbatim: HTML escaped (viser renders raw HTML in
    markdown), markdown's own syntax backslash-escaped (no links, images or emphasis), and a
    zero-width space where a bare address would become a link."""
    escaped = html.escape(AUTOLINK.sub("\u200b", str(text)), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~:/@=<>\"'])", r"\\\1", escaped)


def viser_to_cameras(position: np.ndarray, wxyz: np.ndarray, fov_y: float, aspect: float, height: int) -> tuple[Cameras, int, int]:
    """A viser camera (OpenCV: columns right, down, forward; vertical fov in radians) as the
    engine's :class:`Cameras` (OpenGL c2w: columns right, up, back; focal as a multiple of the
    image width). Returns the cameras and the (height, width) to render at the client's aspect."""
    rot = tf.SO3(np.asarray(wxyz, dtype=np.float64)).as_matrix()
    right, down, forward = rot[:, 0], rot[:, 1], rot[:, 2]
    pos = np.asarray(position, dtype=np.float64)
    c2w = np.stack([right, -down, -forward, pos], axis=1)[None].astype(np.float32)
    width = max(8, min(4 * height, int(round(height * aspect))))
    focal_px = 0.5 * height / math.tan(0.5 * fov_y)
    focal = torch.tensor([focal_px / width], dtype=torch.float32)
    dist = float(np.linalg.norm(pos))
    el = math.degrees(math.asin(max(-1.0, min(1.0, pos[2] / dist)))) if dist > 0 else 0.0
    az = math.degrees(math.atan2(pos[1], pos[0])) % 360.0
    cams = Cameras(torch.from_numpy(c2w), focal, torch.tensor([az]), torch.tensor([el]), torch.tensor([dist]))
    return cams, height, width


def cameras_to_viser(c2w: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (3, 4) OpenGL c2w (a tensor or an array) -> viser (wxyz, position) in its OpenCV convention."""
    m = (c2w.detach().cpu().numpy() if isinstance(c2w, torch.Tensor) else np.asarray(c2w)).astype(np.float64)
    rot = np.stack([m[:, 0], -m[:, 1], -m[:, 2]], axis=1)
    return tf.SO3.from_matrix(rot).wxyz, m[:, 3]


@dataclass
class ViewSettings:
    light_azimuth: float = 30.0
    light_elevation: float = 35.0
    light_intensity: float = 0.75
    ambient: float = 0.2
    mode: str = "lit"

    def lights(self) -> Lights:
        pos = spherical_to_position(torch.tensor([self.light_azimuth]), torch.tensor([self.light_elevation]), torch.tensor([3.0]))
        return Lights(pos, torch.tensor([self.light_intensity]), torch.tensor([self.ambient]))


@dataclass
class ClientView:
    client: viser.ClientHandle
    owner: str | None = None  # whose runs this client follows (None: the newest finished result)
    settings: ViewSettings = field(default_factory=ViewSettings)
    controls: dict = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    camera_changed: float = 0.0
    settings_version: int = 0
    renders: int = 0
    last_render: float = 0.0
    last_image: np.ndarray | None = None
    last_size: int = 0
    thread: threading.Thread | None = None
    shadow: Renderer | None = None  # this client's copy of the scene it renders
    shadow_key: tuple | None = None  # which run, and which snapshot or checkpoint of it, the copy holds
    run_id: str | None = None  # the run shown
    frustums: list = field(default_factory=list)  # this client's own frustum handles (client.scene)
    frustum_lock: threading.Lock = field(default_factory=threading.Lock)
    """held while this client's frustums are placed: the frustum thread and a connecting client
    must not both create the same-named frustum (viser then removes the first one's handle)"""
    frustums_visible: bool = True
    poses: list = field(default_factory=list)  # the training cameras shown to this client: (c2w, focal) each
    poses_key: tuple | None = None


class Viewer:
    def __init__(self, manager: RunManager, host: str = "127.0.0.1", port: int = 8080, full_size: int = 128, low_size: int = 48,
                 max_size: int = 512, min_interval: float = 0.2, scene_interval: float = 1.0, settle: float = 0.3, frustum_interval: float = 0.5):
        self.manager = manager
        self.full_size, self.low_size, self.max_size = full_size, low_size, max(full_size, max_size)
        self.min_interval, self.scene_interval, self.settle = min_interval, scene_interval, settle
        self.frustum_interval = frustum_interval
        self.server = viser.ViserServer(host=host, port=port, label="DreamFusion live viewer", verbose=False)
        self.server.scene.set_up_direction("+z")
        self.clients: dict[int, ClientView] = {}
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)
        self._frustum_thread = threading.Thread(target=self._frustum_loop, name="viewer-frustums", daemon=True)
        self._frustum_thread.start()

    @property
    def host(self) -> str:
        return self.server.get_host()

    @property
    def port(self) -> int:
        return self.server.get_port()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ scene
    def _frustum_loop(self) -> None:
        """Show each client the cameras its run trained with in its last steps as frustums, moved
        as training draws new ones (``frustum_interval`` seconds apart at most)."""
        while not self._stopping.wait(self.frustum_interval):
            with self.lock:
                views = list(self.clients.values())
            for view in views:
                try:
                    run = self.manager.viewer_run(view.owner)
                    active = run is not None and run.worker is not None
                    key = (run.id, run.step) if active else None
                    if key == view.poses_key:
                        continue
                    view.poses_key = key
                    self._place_frustums(view, list(run.cameras) if active else [])
                except Exception as exc:  # noqa: BLE001 - the viewer must outlive a bad update
                    print(f"viewer: training cameras not shown: {type(exc).__name__}: {exc}")

    def show_training_cameras(self, poses: list) -> None:
        """Place one frustum per (c2w, focal) in ``poses`` in every client's own scene."""
        with self.lock:
            views = list(self.clients.values())
        for view in views:
            if not view.stop.is_set():
                self._place_frustums(view, poses)

    def _place_frustums(self, view: ClientView, poses: list) -> None:
        """Move (or create) one client's frustums to ``poses``, one placement at a time per client.
        A failure (e.g. viser's "removed handle" of a client that just left) is reported and costs
        only this client its frustums: not the other clients', nor this one's renders."""
        try:
            with view.frustum_lock:
                view.poses = list(poses)
                for i, (c2w, focal) in enumerate(poses):
                    wxyz, pos = cameras_to_viser(c2w)
                    fov = 2 * math.atan(0.5 / focal)
                    if i < len(view.frustums):
                        h = view.frustums[i]
                        h.wxyz, h.position, h.fov = wxyz, pos, fov
                        h.visible = view.frustums_visible
                    else:
                        view.frustums.append(view.client.scene.add_camera_frustum(
                            f"/training_cameras/{i}", fov=fov, aspect=1.0, scale=0.08, thickness=0.003, color=(230, 120, 30),
                            wxyz=wxyz, position=pos, visible=view.frustums_visible))
                for h in view.frustums[len(poses):]:
                    h.visible = False
        except Exception as exc:  # noqa: BLE001 - frustums are extras: the viewer must outlive a bad update
            if not view.stop.is_set():
                print(f"viewer: training cameras not shown to client {view.client.client_id}: {type(exc).__name__}: {exc}")

    def _scene(self, view: ClientView, run: Run) -> Renderer | None:
        """This client's copy of ``run``'s latest scene (refreshed in place when a newer one exists)."""
        from dreamfusion.checkpoint import build_scene, load_scene, load_scene_tensors

        source = self.manager.scene_source(run, self.scene_interval)
        if source is None:
            return view.shadow if view.shadow_key is not None and view.shadow_key[1] == run.id else None
        key, data = source
        if key == view.shadow_key:
            return view.shadow
        if isinstance(data, dict):
            scene = view.shadow if view.shadow is not None and view.shadow_key is not None and view.shadow_key[1] == run.id else None
            scene = scene or build_scene(run.cfg)
            load_scene_tensors(scene, {k: torch.from_numpy(v) for k, v in data.items()})
        else:
            scene, _, _ = load_scene(data)
        view.shadow, view.shadow_key = scene, key
        return scene

    # ------------------------------------------------------------------ clients
    def _client_owner(self, client: viser.ClientHandle) -> str | None:
        """Whose runs a client follows: the key in the address it connected to (through the page's
        proxy: ``/viewer/k/<key>``); None for an address without one."""
        try:
            connection = self.server._websock_server._live_connections[client.client_id]  # noqa: SLF001 - viser keeps the request there
            match = KEY_IN_PATH.search(connection.request.path.split("?")[0])
        except (AttributeError, KeyError):
            return None
        return self.manager.viewer_owner(match.group(1)) if match else None

    def _connect(self, client: viser.ClientHandle) -> None:
        view = ClientView(client, owner=self._client_owner(client))
        with self.lock:
            self.clients[client.client_id] = view
        client.camera.position = (1.75, 0.65, 0.75)  # about the training cameras' distance
        client.camera.look_at = (0.0, 0.0, 0.0)
        client.camera.up_direction = (0.0, 0.0, 1.0)

        gui = client.gui
        view.controls["status"] = gui.add_markdown("Waiting for a run: start one on the Gradio page.")
        with gui.add_folder("View (does not affect training)"):
            s = view.settings
            view.controls["mode"] = gui.add_dropdown("Shading", options=list(SHADING_MODES), initial_value=s.mode)
            view.controls["light_azimuth"] = gui.add_slider("Light azimuth", min=-180.0, max=180.0, step=1.0, initial_value=s.light_azimuth)
            view.controls["light_elevation"] = gui.add_slider("Light elevation", min=-90.0, max=90.0, step=1.0, initial_value=s.light_elevation)
            view.controls["light_intensity"] = gui.add_slider("Light intensity", min=0.0, max=2.0, step=0.05, initial_value=s.light_intensity)
            view.controls["ambient"] = gui.add_slider("Ambient", min=0.0, max=1.0, step=0.05, initial_value=s.ambient)
            view.controls["frustums"] = gui.add_checkbox("Training cameras", initial_value=True)

        @view.controls["frustums"].on_update
        def _(event: viser.GuiEvent[viser.GuiCheckboxHandle]):  # this visitor's frustums only
            # under the client's frustum lock: a placement running now would otherwise set a handle
            # back to the visibility it read before this change
            with view.frustum_lock:
                view.frustums_visible = bool(event.target.value)
                for h in view.frustums[:len(view.poses)]:
                    h.visible = view.frustums_visible

        @client.camera.on_update
        def _(camera: viser.CameraHandle):
            view.camera_changed = time.time()

        view.thread = threading.Thread(target=self._render_loop, args=(view,), name=f"viewer-{client.client_id}", daemon=True)
        view.thread.start()

    def _disconnect(self, client: viser.ClientHandle) -> None:
        with self.lock:
            view = self.clients.pop(client.client_id, None)
        if view is not None:
            view.stop.set()

    @staticmethod
    def status_text(run: Run | None, own: bool) -> str:
        """The viewer's status line (markdown, every visitor's text escaped)."""
        if run is None:
            return "Waiting for a run: start one on the Gradio page."
        whose = "" if own else "Newest result · "
        return f"{whose}**{run.status}** · step {run.step}/{run.total_steps} · *{markdown_text(run.prompt)}*"

    def _render_loop(self, view: ClientView) -> None:
        torch.set_num_threads(1)
        last_key = None
        status_text = ""
        size = self.full_size
        while not view.stop.wait(0.05):
            try:
                run = self.manager.viewer_run(view.owner)
                text = self.status_text(run, run is not None and view.owner is not None and run.owner == view.owner)
                if text != status_text:
                    view.controls["status"].content = text
                    status_text = text
                if run is None:
                    continue
                cam = view.client.camera
                if cam.update_timestamp == 0.0:  # no camera message from the browser yet
                    continue
                # the settings are read from the GUI handles each time, so a change made in the
                # browser or by the server (handle.value = ...) shows alike
                view.settings = ViewSettings(**{k: view.controls[k].value for k in
                                                ("mode", "light_azimuth", "light_elevation", "light_intensity", "ambient")})
                now = time.time()
                if now - view.last_render < self.min_interval:
                    continue
                scene = self._scene(view, run)
                if scene is None:
                    continue
                moving = now - view.camera_changed < self.settle
                key = (view.shadow_key, tuple(np.round(cam.position, 5)), tuple(np.round(cam.wxyz, 5)), round(cam.fov, 5),
                       round(cam.aspect, 4), tuple(vars(view.settings).values()))
                if moving:
                    size = self.low_size
                elif key != last_key or view.last_size < self.full_size:
                    size = self.full_size
                elif run.status != "running" and view.last_size < self.refine_limit(cam):
                    # a still view of a scene that does not change (paused or finished): sharper, step by
                    # step; a run in training keeps full_size, its next snapshot is due soon
                    size = min(self.refine_limit(cam), view.last_size * 2)
                else:
                    continue
                if key == last_key and size == view.last_size:
                    continue
                image = self.render(scene, cam.position, cam.wxyz, cam.fov, cam.aspect, size, view.settings)
                view.client.scene.set_background_image(image, format="jpeg", jpeg_quality=90)
                view.last_image, view.last_size = image, size
                view.renders += 1
                view.last_render = time.time()
                view.run_id = run.id
                last_key = key
            except Exception as exc:  # noqa: BLE001 - a client going away mid-render must not kill the server
                if view.stop.is_set():
                    break
                print(f"viewer: render for client {view.client.client_id} failed: {type(exc).__name__}: {exc}")
                view.stop.wait(1.0)

    def refine_limit(self, cam: viser.CameraHandle) -> int:
        """The sharpest render for a still view: the client's canvas height, at most ``max_size``."""
        try:
            canvas = int(cam.image_height or 0)
        except (AttributeError, TypeError, ValueError):
            canvas = 0
        return max(self.full_size, min(self.max_size, canvas or self.full_size))

    @staticmethod
    @torch.no_grad()
    def render(scene: Renderer, position: np.ndarray, wxyz: np.ndarray, fov: float, aspect: float, size: int, settings: ViewSettings) -> np.ndarray:
        """(H, W, 3) uint8 image of a scene (a snapshot) from a viser camera (the engine's
        ``render_views`` is square only, so this calls the renderer directly)."""
        device = scene.field.density_grid.device
        cams, h, w = viser_to_cameras(position, wxyz, fov, aspect, size)
        out = scene.render(cams.to(device), settings.lights().to(device), h, w, settings.mode)
        return to_uint8(out["image"][0])

    def stop(self) -> None:
        with self.lock:
            views = list(self.clients.values())
            self.clients.clear()
        for v in views:
            v.stop.set()
        self._stopping.set()
        self.server.stop()
