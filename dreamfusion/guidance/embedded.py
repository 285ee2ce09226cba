"""Guidance from the embedded prior shipped in ``assets/prior``: a small pixel-space diffusion
model of the procedural world, conditioned on MiniLM sentence-encoder states. Runs offline."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..cameras import CameraConfig, sample_backgrounds
from ..prior.model import (
    ASSET_DIR,
    WEIGHTS_FILE,
    FrozenUNet,
    GraphCache,
    PriorConfig,
    RenderConditions,
    TextCondition,
    TextEncoder,
    default_cache_dir,
    load_unet,
    predict_noise,
)
from .base import Guidance, GuidanceConfig, GuidanceError, RenderBatch


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): elsewhere it is emulated
    and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bfloat16(setting: str, device: torch.device | str) -> bool:
    """GuidanceConfig.cpu_bfloat16 resolved for ``device``: on (a CPU), off, or auto (a CPU with
    native bfloat16)."""
    if torch.device(device).type != "cpu" or setting == "off":
        return False
    return setting == "on" or cpu_has_native_bfloat16()


class EmbeddedGuidance(Guidance):
    name = "embedded"

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        folder = Path(cfg.model) if cfg.model else ASSET_DIR
        try:
            self.prior_cfg = PriorConfig.load(folder)
            if not (folder / WEIGHTS_FILE).exists():
                raise FileNotFoundError(f"no embedded prior weights at {folder / WEIGHTS_FILE}")
        except FileNotFoundError as exc:
            raise GuidanceError(f"embedded prior not found: {exc}") from None
        cache = GraphCache.of_prior(default_cache_dir(), folder)
        build = lambda: load_unet(folder, device)[0]  # noqa: E731
        # its graphs are shared by the light copies of this prior. Where an earlier process traced this
        # prior's U-Net its graphs are read back and the U-Net is built only if one is missing; else it
        # is built (and its weights checked against the config) now
        self.frozen_unet = FrozenUNet(build if cache.any_graph() else build(), cache)
        self.encoder = TextEncoder(self.prior_cfg.max_tokens, device)
        self.max_tokens = self.prior_cfg.max_tokens
        self.alphas_cumprod = self.prior_cfg.alphas_cumprod().to(self.device)
        self.image_size = self.prior_cfg.image_size
        self.folder = folder
        self._vocabulary: list = []  # built on first use, shared by the light copies of this prior

    def encode(self, texts: list[str]) -> TextCondition:
        return self.encoder.condition(texts)

    def concat(self, conds: list[TextCondition]) -> TextCondition:
        return TextCondition.cat(conds)

    def truncation_note(self, text: str) -> str | None:
        return self.encoder.truncation_note(text)

    def vocabulary_note(self, prompt: str) -> str | None:
        """The world's vocabulary check (:mod:`dreamfusion.prior.vocabulary`)."""
        from ..prior.vocabulary import Vocabulary

        if not self._vocabulary:
            self._vocabulary.append(Vocabulary(self.encoder, self.folder))
        return self._vocabulary[0].match(prompt).note()

    def camera_config(self) -> CameraConfig:
        """The camera and light distribution the prior's training renders came from."""
        return self.prior_cfg.camera_config()

    def backgrounds(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Random solid colours (white for a fraction 1 - ``random_background``) for a prior trained
        on them; None for one trained on white only, which grades renders on the scene's white."""
        if self.prior_cfg.random_background <= 0 or self.cfg.random_background <= 0:
            return None
        return sample_backgrounds(n, self.cfg.random_background, generator)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, C, H, W) in [0, 1] -> (B, C, S, S) in [-1, 1], area-averaged (antialiased)
        down to the prior's size, as its training renders were."""
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="area" if images.shape[-1] > self.image_size else "bilinear")
        return images * 2 - 1

    def renders_input(self, renders: RenderBatch) -> torch.Tensor:
        """RGB, and for a 4-channel prior the renders' opacity as the fourth channel (with
        ``use_alpha`` off it is passed detached: the prior still sees it, SDS does not push it)."""
        if self.prior_cfg.channels == 3:
            return self.model_input(renders.images)
        if renders.opacity is None:
            raise GuidanceError("this embedded prior grades renders with their opacity (RGB + alpha); none was given")
        opacity = renders.opacity if self.cfg.use_alpha else renders.opacity.detach()
        return self.model_input(torch.cat([renders.images, opacity], dim=1))

    def render_features(self, renders: RenderBatch) -> RenderConditions | None:
        """Cameras, light and shading mode of each render, for a camera-aware prior (None: the
        prior takes none, or ``use_render_conditions`` is off, or the renders came without them)."""
        if not (self.prior_cfg.condition_features or self.prior_cfg.ray_channels) or not self.cfg.use_render_conditions:
            return None
        if renders.cameras is None or renders.lights is None or renders.modes is None:
            return None
        cams, lights = renders.cameras.to("cpu"), renders.lights.to("cpu")
        return RenderConditions.of(self.prior_cfg, cams, lights, renders.modes).to(self.device)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextCondition,
                      features: RenderConditions | None = None) -> torch.Tensor:
        dtype = torch.bfloat16 if self.cfg.frozen_unet and uses_bfloat16(self.cfg.cpu_bfloat16, self.device) else None
        if self.cfg.frozen_unet:
            return predict_noise(self.prior_cfg, x_t, t, cond, features, self.frozen_unet, dtype=dtype)
        return predict_noise(self.unet, x_t, t, cond, features)

    @property
    def unet(self):  # noqa: ANN201 - diffusers' UNet2DConditionModel, imported only where it is built
        """The prior's U-Net (built on first use where cached graphs made it unneeded so far)."""
        return self.frozen_unet.unet
