"""Guidance from DeepFloyd IF's stage I (diffusers layout): a pixel-space diffusion model at 64 x 64,
conditioned on T5 text states, like the paper's Imagen base model. The renders are resized to 64 px
and graded as pixels: no VAE, so the SDS gradient reaches the renders directly.

``cfg.model`` is a local folder (``tokenizer/``, ``text_encoder/``, ``unet/``, ``scheduler/``) or a
hub id; empty means :data:`DEFAULT_MODEL` (gated on the hub: accept its licence first). Only stage
I is used (the super-resolution stages never grade anything). The U-Net predicts the noise and its
variance (six channels); SDS uses the noise. Defaults in the registry (``config.GUIDANCES``):
guidance weight 20 and t ~ U(0.02, 0.98), as threestudio's dreamfusion-if config. Precision and
memory on a GPU: :mod:`dreamfusion.guidance.pipeline` (the 4.7 B-parameter T5-XXL encoder never
stays on the GPU).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import GuidanceConfig, GuidanceError
from .pipeline import ComponentError, DiffusersGuidance, load_component, load_pipeline

DEFAULT_MODEL = "DeepFloyd/IF-I-XL-v1.0"
#: IF's pipelines pad and cut every prompt to this many T5 tokens, as it was trained
IF_MAX_TOKENS = 77
_ADVICE = "download it once (the hub repository is gated: accept its licence) and pass --model /path/to/folder, or use --guidance embedded (offline)"


def _tokenizer_files(source: str) -> set[str]:
    """Which of the T5 tokenizer's files (``spiece.model``, ``tokenizer.json``) a folder or the local
    hub cache holds for ``source``."""
    names = ("spiece.model", "tokenizer.json")
    folder = Path(source).expanduser() / "tokenizer"
    if folder.is_dir():
        return {n for n in names if (folder / n).is_file()}
    try:
        from huggingface_hub import try_to_load_from_cache

        return {n for n in names if isinstance(try_to_load_from_cache(source, f"tokenizer/{n}"), str)}
    except Exception:  # noqa: BLE001 - not a hub id, or no cache
        return set()


def _load_tokenizer(source: str, local_only: bool) -> object:
    """IF's T5 tokenizer. DeepFloyd's repositories ship it as SentencePiece's ``spiece.model`` only,
    which transformers reads with the ``sentencepiece`` package: without it, that is what the
    error says (transformers' own message names another library)."""
    from transformers import T5Tokenizer

    try:
        return T5Tokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one GuidanceError line
        files = _tokenizer_files(source)
        why: BaseException = exc
        if importlib.util.find_spec("sentencepiece") is None and "spiece.model" in files and "tokenizer.json" not in files:
            why = ImportError("its spiece.model is read with the sentencepiece package, which is not installed: pip install sentencepiece")
        raise ComponentError("tokenizer", why) from None


def _load_components(source: str, local_only: bool, dtype: torch.dtype, text_dtype: torch.dtype) -> dict:
    """tokenizer, text_encoder, unet and scheduler of IF stage I from a diffusers-layout folder or repo."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5EncoderModel

    parts = {"tokenizer": _load_tokenizer(source, local_only)}
    parts["text_encoder"] = load_component(T5EncoderModel, source, "text_encoder", local_only, text_dtype)
    parts["unet"] = load_component(UNet2DConditionModel, source, "unet", local_only, dtype)
    try:
        parts["scheduler"] = DDPMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001
        raise ComponentError("scheduler", exc) from None
    return parts


class DeepFloydIFGuidance(DiffusersGuidance):
    name = "deepfloyd-if"
    text_encoder_name = "T5"

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        source = cfg.model or DEFAULT_MODEL
        parts = load_pipeline("deepfloyd-if", source, lambda src, local: _load_components(src, local, self.dtype, self.text_dtype), _ADVICE)
        self.take_components(parts)
        if self.unet.config.in_channels != 3:
            raise GuidanceError(f"deepfloyd-if model {source!r} is not IF's stage I: its U-Net takes {self.unet.config.in_channels} channels, "
                                f"not the 3 of an RGB image (the super-resolution stages are not priors); {_ADVICE}") from None
        if self.prediction_type != "epsilon":
            raise GuidanceError(f"deepfloyd-if: unsupported prediction_type {self.prediction_type!r} (IF predicts epsilon)")
        self.max_tokens = IF_MAX_TOKENS
        self.image_size = self.unet_sample_size()

    # -- the Guidance interface
    def preprocess(self, text: str) -> str:
        """As IF's pipelines prepare a prompt without caption cleaning: lower case, stripped."""
        return text.lower().strip()

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """T5's last hidden states (B, 77, 4096 for T5-XXL) with the padding masked, as IF's pipelines encode."""
        return self.text_encoder(input_ids, attention_mask=attention_mask)[0]

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> (B, 3, 64, 64) in [-1, 1] (bilinear resize, as the peers
        do), in fp32: pixels are what IF denoises, so the SDS gradient lands on them directly."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return images * 2 - 1

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """eps (B, 3, S, S): the first three of the U-Net's six output channels (the others are its
        learned variance, which SDS does not use)."""
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample
        return out[:, : x_t.shape[1]]
