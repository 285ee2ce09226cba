"""The guidance interface: a frozen text-to-image diffusion model that grades renders.

Each step the trainer hands the guidance a :class:`RenderBatch`: the renders and how they were
made (cameras, lights, shading mode, opacity), so a prior that knows about cameras can use them
and one that does not (Stable Diffusion) ignores them. A prior implements ``encode`` (texts -> a
condition, cached by the caller), ``model_input`` (renders in [0, 1] -> what its U-Net denoises:
resized pixels or VAE latents, differentiable) and ``predict_noise``; :meth:`Guidance.sds_loss` is
shared by every prior. :meth:`Guidance.loss` is what the trainer calls: SDS, unless a guidance
(the reference) grades renders another way.

Random draws (timesteps, noise) are made on the CPU from the generator passed in and then moved to
the prior's device, so a seed draws the same on any device. Text encodings are kept on the CPU
(bounded, :class:`TextCache`) and moved to the device for each step.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..cameras import Cameras, Lights
from ..config import CameraConfig, GuidanceConfig
from ..sds import camera_guidance, classifier_free_guidance, noise_images, sds_gradient, sds_surrogate_loss, timestep_weight


@dataclass
class RenderBatch:
    """Renders and the conditions they were made under. ``images`` (B, 3, H, W) in [0, 1] and
    ``opacity`` (B, 1, H, W) are differentiable; ``cameras``, ``lights`` (B of each) and ``modes``
    (B shading modes) are None when unknown (an image from elsewhere)."""

    images: torch.Tensor
    opacity: torch.Tensor | None = None
    cameras: Cameras | None = None
    lights: Lights | None = None
    modes: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def _repeat(conditions: object, n: int) -> object:
    """A batch of conditions repeated ``n`` times along its first dimension."""
    if conditions is None:
        return None
    if isinstance(conditions, torch.Tensor):
        return torch.cat([conditions] * n)
    return conditions.repeat(n)


def as_render_batch(renders: RenderBatch | torch.Tensor) -> RenderBatch:
    return renders if isinstance(renders, RenderBatch) else RenderBatch(renders)


class GuidanceError(RuntimeError):
    """A prior that cannot be loaded or used: the message is meant for the user as is."""


#: encoded texts a prior keeps (on the CPU); past this many the least recently used is dropped, so
#: a server that sees prompt after prompt keeps its memory bounded
TEXT_CACHE_SIZE = 256


def to_device(value: object, device: torch.device | str) -> object:
    """A tensor, or an object with a ``to(device)`` method (a text condition), on ``device``."""
    return value.to(device)


class TextCache:
    """Encoded texts on the CPU, at most ``size`` of them, the least recently used dropped first.
    Thread-safe: the light copies of a loaded prior (one per run) share one."""

    def __init__(self, size: int = TEXT_CACHE_SIZE):
        if size < 1:
            raise ValueError(f"a text cache holds at least one text, got {size}")
        self.size = size
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> object | None:
        with self._lock:
            value = self._items.get(text)
            if value is not None:
                self._items.move_to_end(text)
            return value

    def put(self, text: str, value: object) -> None:
        with self._lock:
            self._items[text] = value
            self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __contains__(self, text: str) -> bool:
        with self._lock:
            return text in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def texts(self) -> list[str]:
        """The cached texts, least recently used first."""
        with self._lock:
            return list(self._items)


class Guidance:
    """Base class; subclasses set ``alphas_cumprod`` (T,) and implement the three methods."""

    name = "base"
    alphas_cumprod: torch.Tensor
    max_tokens: int = 77

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.text_cache = TextCache()
        self._text_lock = threading.RLock()  # one encoding at a time (a text encoder may be moving between devices)

    # -- to implement
    def encode(self, texts: list[str]) -> object:
        raise NotImplementedError

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: object, features: object = None) -> torch.Tensor:
        """eps for a batch; ``cond`` is what :meth:`encode` returned for as many texts; ``features``
        what :meth:`render_features` returned (priors that take none never receive any)."""
        raise NotImplementedError

    # -- may override
    def renders_input(self, renders: RenderBatch) -> torch.Tensor:
        """What the U-Net denoises, from the whole batch (default: :meth:`model_input` of the images)."""
        return self.model_input(renders.images)

    def render_features(self, renders: RenderBatch) -> object:
        """Per-render conditions for a camera-aware prior (a tensor (B, F), or any object with a
        ``repeat(n)`` method that repeats its batch), or None (the default: text only)."""
        return None

    def backgrounds(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Solid colours (n, 3) to render the next ``n`` views on, for a prior that was trained on
        them, or None (the default): the scene's own background."""
        return None

    def check_prompt(self, prompt: str) -> None:
        """Raise :class:`GuidanceError` for a prompt this guidance cannot grade (default: any goes)."""

    def vocabulary_note(self, prompt: str) -> str | None:
        """A note for the user when ``prompt`` is far from anything this prior knows (default: None,
        a prior that knows the open world)."""
        return None

    def camera_config(self) -> CameraConfig | None:
        """The camera/light distribution this prior was trained on (a CameraConfig), or None:
        training then draws from its own config."""
        return None

    def concat(self, conds: list) -> object:
        raise NotImplementedError

    def truncation_note(self, text: str) -> str | None:
        return None

    def text_session(self) -> contextlib.AbstractContextManager:
        """A block in which several texts are encoded (a prior whose text encoder must be brought
        to the GPU brings it once for all of them); the default does nothing."""
        return contextlib.nullcontext()

    # -- shared
    def _encoded(self, texts: list[str]) -> dict[str, object]:
        """Each distinct text's encoding, on the CPU: from the cache, or encoded now (one text at a
        time, in one :meth:`text_session`) and cached."""
        found, missing = {}, []
        for t in dict.fromkeys(texts):
            value = self.text_cache.get(t)
            if value is None:
                missing.append(t)
            else:
                found[t] = value
        if missing:
            with self._text_lock, self.text_session():
                for t in missing:
                    found[t] = to_device(self.encode([t]), "cpu")
                    self.text_cache.put(t, found[t])
        return found

    def prepare(self, texts: list[str]) -> None:
        """Encode ``texts`` now (all the texts a prompt will be graded with), so the text encoder
        is needed once per prompt; a guidance without a text encoder ignores it."""
        if type(self).encode is not Guidance.encode:
            self._encoded(texts)

    def condition(self, texts: list[str]) -> object:
        """Encoded texts on the prior's device, each text encoded once per loaded prior and kept on
        the CPU (:class:`TextCache`)."""
        found = self._encoded(texts)
        return to_device(self.concat([found[t] for t in texts]), self.device)

    def loss(self, renders: RenderBatch, texts: list[str], t_range: tuple[float, float], generator: torch.Generator | None = None) -> dict:
        """The trainer's loss for a batch of renders: SDS (see :meth:`sds_loss`)."""
        return self.sds_loss(renders, texts, t_range, generator)

    def sds_loss(self, renders: RenderBatch | torch.Tensor, texts: list[str], t_range: tuple[float, float],
                 generator: torch.Generator | None = None) -> dict:
        """Surrogate loss whose gradient w.r.t. the model input is w(t)(eps_hat - eps) / B (the
        mean over the batch). Pass a CPU ``generator``: draws are made on the CPU, then moved.

        ``renders``: a :class:`RenderBatch` (or just its images, (B, 3, H, W) in [0, 1]),
        differentiable; one text per image. The unconditional branch of guidance drops the text
        but keeps the render conditions (as MVDream does); with ``camera_guidance_scale`` w_c > 0 a
        third branch keeps the text and drops the conditions, and w_c times what they add is added
        (:func:`~dreamfusion.sds.camera_guidance`). Returns ``loss`` (scalar), ``t`` (B,)
        and ``grad_norm``."""
        renders = as_render_batch(renders)
        x = self.renders_input(renders)
        features = self.render_features(renders)
        draws = max(1, int(getattr(self.cfg, "draws", 1)))
        if draws > 1:  # independent (t, eps) per copy; the mean over copies is the gradient
            x = x.repeat(draws, *([1] * (x.dim() - 1)))
            texts = list(texts) * draws
            features = _repeat(features, draws)
        b = x.shape[0]
        n_t = self.alphas_cumprod.shape[0]
        lo, hi = int(t_range[0] * n_t), max(int(t_range[0] * n_t) + 1, int(t_range[1] * n_t))
        t = torch.randint(lo, hi, (b,), generator=generator).to(self.device)
        eps = torch.randn(x.shape, generator=generator).to(self.device)  # fp32 whatever the prior's precision
        a_t = self.alphas_cumprod.to(self.device)[t]
        with torch.no_grad():
            z_t = noise_images(x.detach().float(), eps, a_t)
            cond = self.concat([self.condition(texts), self.condition([""] * b)])
            both = (torch.cat([z_t, z_t]), torch.cat([t, t]), cond)
            eps = eps.float()
            out = self.predict_noise(*both) if features is None else self.predict_noise(*both, _repeat(features, 2))
            eps_c, eps_u = out.float().chunk(2)
            eps_hat = classifier_free_guidance(eps_c, eps_u, self.cfg.guidance_scale)
            w_c = float(getattr(self.cfg, "camera_guidance_scale", 0.0))
            if features is not None and w_c > 0:  # a third branch: the text without the render conditions
                eps_nc = self.predict_noise(z_t, t, self.condition(texts)).float()
                eps_hat = camera_guidance(eps_hat, eps_c, eps_nc, w_c)
            grad = sds_gradient(eps_hat, eps, timestep_weight(a_t.float(), self.cfg.weighting))
            grad = torch.nan_to_num(grad)
        return {"loss": sds_surrogate_loss(x.float(), grad) / b, "t": t, "grad_norm": float(grad.norm() / b)}
