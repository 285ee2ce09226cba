"""Guidance from a Stable Diffusion 1.x/2.x checkpoint (diffusers layout): the renders are
encoded by its VAE and the latents graded by its U-Net, conditioned on CLIP text states.

``cfg.model`` is a local folder (``tokenizer/``, ``text_encoder/``, ``vae/``, ``unet/``,
``scheduler/``) or a hub id; empty means :data:`DEFAULT_MODEL`. Nothing is ever fine-tuned: every
weight is frozen and only the gradient through the VAE encoder reaches the renders.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Guidance, GuidanceConfig, GuidanceError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
HUB_TIMEOUT_S = 5.0
_ADVICE = "download it once and pass --model /path/to/folder, or use --guidance embedded (offline)"


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - an old or broken huggingface_hub: try the hub anyway
        return False


def _looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a folder."""
    return source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1 or "\\" in source or os.path.exists(source)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _load_components(source: str, local_only: bool) -> dict:
    """tokenizer, text_encoder, vae, unet and scheduler from a diffusers-layout folder or repo."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"local_files_only": local_only}
    # without accelerate diffusers falls back to a full init anyway; say so to silence its warning
    diffusers_kw = kw if importlib.util.find_spec("accelerate") else {**kw, "low_cpu_mem_usage": False}
    parts = {}
    for key, cls in (("tokenizer", CLIPTokenizer), ("text_encoder", CLIPTextModel), ("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        try:
            parts[key] = cls.from_pretrained(source, subfolder=key, **(diffusers_kw if key in ("vae", "unet") else kw))
        except Exception as exc:  # noqa: BLE001 - any failure becomes one GuidanceError line
            raise _ComponentError(key, exc) from None
    try:
        parts["scheduler"] = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except Exception as exc:  # noqa: BLE001
        raise _ComponentError("scheduler", exc) from None
    return parts


class _ComponentError(Exception):
    def __init__(self, component: str, exc: BaseException):
        super().__init__(component)
        self.component, self.exc = component, exc


def _check_hub(repo_id: str) -> str | None:
    """None if ``repo_id`` looks downloadable, else why not (fast: a short timeout)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except Exception as exc:  # noqa: BLE001
        return f"huggingface_hub is unusable ({_one_line(exc)})"
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "the hub repository is gated: accept its licence and log in (huggingface-cli login)"
    except RepositoryNotFoundError:
        return "no local folder of that name and no such repository on the hub (or it is private)"
    except Exception as exc:  # noqa: BLE001 - connection errors, timeouts, HTTP errors, bad ids
        return f"no local folder of that name and the hub is unreachable (offline?) ({_one_line(exc, 120)})"
    return None


class StableDiffusionGuidance(Guidance):
    name = "stable-diffusion"

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        source = cfg.model or DEFAULT_MODEL
        parts = self._load(source)
        self.tokenizer = parts["tokenizer"]
        self.scheduler = parts["scheduler"]
        self.dtype = torch.float16 if cfg.half_precision and self.device.type == "cuda" else torch.float32
        self.text_encoder, self.vae, self.unet = (self._freeze(parts[k]) for k in ("text_encoder", "vae", "unet"))
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        self.max_tokens = int(self.tokenizer.model_max_length)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.unet.config.sample_size
        sample_size = sample_size[0] if isinstance(sample_size, (tuple, list)) else sample_size
        self.image_size = int(sample_size) * self.vae_scale_factor
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def _freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device) if self.dtype == torch.float32 else module.to(self.device, self.dtype)
        return module.eval().requires_grad_(False)

    @staticmethod
    def _load(source: str) -> dict:
        def fail(why: str):
            raise GuidanceError(f"stable-diffusion model {source!r} could not be loaded: {why}; {_ADVICE}") from None

        try:
            if Path(source).expanduser().is_dir():
                folder = str(Path(source).expanduser())
                try:
                    return _load_components(folder, local_only=True)
                except _ComponentError as err:
                    fail(f"the folder has no usable {err.component}/ ({_one_line(err.exc)})")
            if _looks_like_path(source):
                fail("no folder of that name")
            try:
                from huggingface_hub.utils import validate_repo_id

                validate_repo_id(source)
            except ImportError:
                pass
            except Exception:  # noqa: BLE001 - HFValidationError
                fail("no folder of that name, and it is not a valid hub id either")
            # a hub id: the local cache first (works offline), then the hub itself
            try:
                return _load_components(source, local_only=True)
            except _ComponentError:
                pass
            if _hub_offline():
                fail("no local folder of that name, not in the local cache, and the hub is off (HF_HUB_OFFLINE is set)")
            why = _check_hub(source)
            if why:
                fail(why)
            try:
                return _load_components(source, local_only=False)
            except _ComponentError as err:
                fail(f"its {err.component}/ could not be fetched or read ({_one_line(err.exc)})")
        except GuidanceError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. diffusers/transformers import errors
            fail(_one_line(exc))
        raise AssertionError("unreachable")

    # -- the Guidance interface
    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """CLIP's last hidden states (B, 77, D), padded to the full length as SD was trained."""
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0]

    def concat(self, conds: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(conds)

    def truncation_note(self, text: str) -> str | None:
        ids = self.tokenizer(text, truncation=False)["input_ids"]
        if len(ids) <= self.max_tokens:
            return None
        kept = self.tokenizer.decode(ids[1 : self.max_tokens - 1], skip_special_tokens=True)
        return f"prompt is {len(ids)} tokens, over CLIP's limit of {self.max_tokens}: only '{kept}' is used"

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> VAE latents (B, 4, S/f, S/f), scaled as the U-Net
        expects; differentiable through the (frozen) encoder. The posterior's mean, not a draw: a
        draw would come from torch's global generator (runs would not repeat), and the VAE's
        posterior is so narrow that its mean is what SDS grades anyway."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (images * 2 - 1).to(self.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        return latents * self.scaling_factor

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """eps; a v-prediction U-Net (SD 2.x 768-v) is converted: eps = alpha_t v + sigma_t x_t."""
        x_t = x_t.to(self.dtype)
        out = self.unet(x_t, t, encoder_hidden_states=cond.to(self.dtype)).sample
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].view(-1, 1, 1, 1).to(self.device)
            out = a.sqrt() * out.float() + (1 - a).sqrt() * x_t.float()
        elif self.prediction_type != "epsilon":
            raise GuidanceError(f"stable-diffusion: unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        return out
