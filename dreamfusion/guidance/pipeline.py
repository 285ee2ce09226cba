"""What the diffusers priors (Stable Diffusion, DeepFloyd IF) share: loading a diffusers-layout
folder or hub id with one clear error line when it cannot be had, the precision and memory rules
for a GPU, and a text encoder that visits the GPU only to encode.

Memory on a GPU (the defaults aim at 8-12 GB cards):

- the U-Net (and SD's VAE encoder) in fp16 on CUDA (``GuidanceConfig.half_precision``); the CPU
  always computes in fp32;
- attention through PyTorch's ``scaled_dot_product_attention`` (diffusers' default processors
  under torch 2), in slices with ``GuidanceConfig.low_vram``;
- only what SDS uses: SD's VAE encoder (its decoder is dropped at load);
- the text encoder lives in CPU memory. On CUDA it is moved to the GPU for the moment of encoding a
  prompt's texts, if it fits in the GPU's free memory beside the U-Net, and moved back; where it
  does not fit it encodes on the CPU (slowly: minutes for IF's T5-XXL). ``low_vram``: it encodes on
  the CPU, in bfloat16, and never reaches the GPU. The embeddings are computed once per text and
  kept on the CPU (:meth:`~dreamfusion.guidance.base.Guidance.condition`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .base import Guidance, GuidanceConfig, GuidanceError

HUB_TIMEOUT_S = 5.0


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - an old or broken huggingface_hub: try the hub anyway
        return False


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a folder."""
    return source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1 or "\\" in source or os.path.exists(source)


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


class ComponentError(Exception):
    """A component (a subfolder such as ``unet/``) that could not be loaded."""

    def __init__(self, component: str, exc: BaseException):
        super().__init__(component)
        self.component, self.exc = component, exc


def check_hub(repo_id: str) -> str | None:
    """None if ``repo_id`` looks downloadable, else why not (fast: a short timeout)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except Exception as exc:  # noqa: BLE001
        return f"huggingface_hub is unusable ({one_line(exc)})"
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "the hub repository is gated: accept its licence and log in (huggingface-cli login)"
    except RepositoryNotFoundError:
        return "no local folder of that name and no such repository on the hub (or it is private)"
    except Exception as exc:  # noqa: BLE001 - connection errors, timeouts, HTTP errors, bad ids
        return f"no local folder of that name and the hub is unreachable (offline?) ({one_line(exc, 120)})"
    return None


#: loads the components of a pipeline: (source, local_only) -> {name: component}, raising
#: :class:`ComponentError` for the first one that fails
Loader = Callable[[str, bool], dict]


def quiet_libraries() -> None:
    """Model-loading progress bars of transformers/diffusers would bury our own output (called where
    a pipeline is loaded: the embedded prior never imports either library's loaders)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def load_pipeline(name: str, source: str, load: Loader, advice: str) -> dict:
    """A pipeline's components from a local folder, the local hub cache, or the hub, in that order;
    anything that fails is one :class:`GuidanceError` line naming ``name``, ``source``, why, and
    ``advice``."""

    def fail(why: str):
        raise GuidanceError(f"{name} model {source!r} could not be loaded: {why}; {advice}") from None

    try:
        quiet_libraries()
        if Path(source).expanduser().is_dir():
            folder = str(Path(source).expanduser())
            try:
                return load(folder, True)
            except ComponentError as err:
                fail(f"the folder has no usable {err.component}/ ({one_line(err.exc)})")
        if looks_like_path(source):
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
            return load(source, True)
        except ComponentError:
            pass
        if hub_offline():
            fail("no local folder of that name, not in the local cache, and the hub is off (HF_HUB_OFFLINE is set)")
        why = check_hub(source)
        if why:
            fail(why)
        try:
            return load(source, False)
        except ComponentError as err:
            fail(f"its {err.component}/ could not be fetched or read ({one_line(err.exc)})")
    except GuidanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. diffusers/transformers import errors
        fail(one_line(exc))
    raise AssertionError("unreachable")


def load_component(cls: type, source: str, subfolder: str, local_only: bool, dtype: torch.dtype | None = None) -> object:
    """One component with ``from_pretrained`` (diffusers or transformers); weights in ``dtype``. In
    fp16 the repository's ``fp16`` variant is tried first (half the download), then its default
    files. Any failure is a :class:`ComponentError` naming ``subfolder``."""
    kw: dict = {"subfolder": subfolder, "local_files_only": local_only}
    is_diffusers = cls.__module__.startswith("diffusers")
    if dtype is not None:
        kw["torch_dtype" if is_diffusers else "dtype"] = dtype
    if is_diffusers and dtype is not None and not importlib.util.find_spec("accelerate"):
        kw["low_cpu_mem_usage"] = False  # without accelerate diffusers falls back to a full init anyway: say so to silence its warning
    if dtype == torch.float16:
        try:
            return cls.from_pretrained(source, variant="fp16", **kw)
        except Exception:  # noqa: BLE001 - no fp16 variant: the default files, converted
            pass
    try:
        return cls.from_pretrained(source, **kw)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one GuidanceError line
        raise ComponentError(subfolder, exc) from None


def weights_dtype(cfg: GuidanceConfig, device: torch.device) -> torch.dtype:
    """fp16 on CUDA unless ``half_precision`` is off; fp32 elsewhere (a CPU computes in fp32)."""
    return torch.float16 if cfg.half_precision and device.type == "cuda" else torch.float32


def text_encoder_dtype(cfg: GuidanceConfig, device: torch.device) -> torch.dtype:
    """The text encoder's weights: fp32 on a CPU run; on CUDA fp16 (it visits the GPU to encode),
    or bfloat16 with ``low_vram`` (it encodes on the CPU, where fp16 kernels are slow or missing)."""
    if device.type != "cuda":
        return torch.float32
    if cfg.low_vram:
        return torch.bfloat16
    return weights_dtype(cfg, device)


def freeze(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` on ``device`` in ``dtype``, in eval mode, without gradients to its weights (a
    module loaded in ``dtype`` is only moved: diffusers warns about casts after loading)."""
    loaded = next(module.parameters()).dtype
    module = module.to(device) if loaded == dtype else module.to(device, dtype)
    return module.eval().requires_grad_(False)


def save_attention_memory(unet: torch.nn.Module, low_vram: bool) -> None:
    """diffusers' default attention under torch 2 is PyTorch's fused ``scaled_dot_product_attention``
    (memory-efficient kernels on CUDA); ``low_vram`` computes it in slices instead (less memory, slower)."""
    if low_vram:
        unet.set_attention_slice("auto")


#: room the text encoder needs on the GPU beyond its weights, as a fraction of them (activations, allocator slack)
TEXT_ENCODER_HEADROOM = 0.25


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def encoding_device(device: torch.device, low_vram: bool, free_bytes: int, weight_bytes: int) -> torch.device:
    """Where a text encoder of ``weight_bytes`` encodes for a run on ``device``: the GPU when it fits
    in ``free_bytes`` of its free memory with :data:`TEXT_ENCODER_HEADROOM`, else (and always with
    ``low_vram``, and for a run on a CPU) the CPU."""
    if device.type == "cuda" and not low_vram and free_bytes >= weight_bytes * (1 + TEXT_ENCODER_HEADROOM):
        return device
    return torch.device("cpu")


class DiffusersGuidance(Guidance):
    """Base of the priors loaded from diffusers pipelines: a tokenizer and text encoder (kept on the
    CPU, see the module's note), a U-Net and a DDPM scheduler. Subclasses load their components
    and implement :meth:`encode_tokens`, ``model_input`` and ``predict_noise``."""

    #: the text encoder's name in messages (CLIP, T5)
    text_encoder_name = "the text encoder"
    tokenizer: object
    text_encoder: torch.nn.Module

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.dtype = weights_dtype(cfg, self.device)
        self.text_dtype = text_encoder_dtype(cfg, self.device)
        self._text_depth = 0  # nesting of text_session(), under the text lock

    def take_components(self, parts: dict) -> None:
        """Keep what every diffusers prior grades with: the tokenizer, the scheduler and its
        alphas_cumprod on the device, the text encoder on the CPU (it visits the GPU only to encode)
        and the frozen U-Net on the device, its attention as ``low_vram`` asks."""
        self.tokenizer = parts["tokenizer"]
        self.scheduler = parts["scheduler"]
        self.text_encoder = freeze(parts["text_encoder"], "cpu", self.text_dtype)
        self.unet = freeze(parts["unet"], self.device, self.dtype)
        save_attention_memory(self.unet, self.cfg.low_vram)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")

    def unet_sample_size(self) -> int:
        """The U-Net's input size (its config may give it as a number or a pair)."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    # -- the text encoder's visits to the GPU
    def encoding_device(self) -> torch.device:
        """Where texts are encoded now (:func:`encoding_device`): the run's GPU, which the encoder visits,
        or the CPU (a CPU run, ``low_vram``, or too little free GPU memory)."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" and not self.cfg.low_vram else 0
        return encoding_device(self.device, self.cfg.low_vram, free, module_bytes(self.text_encoder))

    @contextlib.contextmanager
    def text_session(self) -> Iterator[torch.device]:
        """The text encoder on :meth:`encoding_device` for the block (it returns to the CPU at the
        end, and the GPU's cached blocks are released); re-entrant and thread-safe."""
        with self._text_lock:
            target = self.encoding_device()
            moves = target.type != "cpu" and self._text_depth == 0
            if moves:
                self.text_encoder.to(target)
            self._text_depth += 1
            try:
                yield target
            finally:
                self._text_depth -= 1
                if moves:
                    self.text_encoder.to("cpu")
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's states for token ids (B, L) on the encoding device."""
        raise NotImplementedError

    def preprocess(self, text: str) -> str:
        return text

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Text states (B, L, D), padded to the full length as the model was trained, on the run's
        device in the U-Net's dtype."""
        tok = self.tokenizer([self.preprocess(t) for t in texts], padding="max_length", max_length=self.max_tokens, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        with self.text_session() as where:
            states = self.encode_tokens(tok.input_ids.to(where), tok.attention_mask.to(where))
        return states.to(self.device, self.dtype)

    def concat(self, conds: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(conds)

    def truncation_note(self, text: str) -> str | None:
        ids = self.tokenizer(self.preprocess(text), truncation=False)["input_ids"]
        if len(ids) <= self.max_tokens:
            return None
        kept_ids = self.tokenizer(self.preprocess(text), truncation=True, max_length=self.max_tokens)["input_ids"]
        kept = self.tokenizer.decode(kept_ids, skip_special_tokens=True)
        return f"prompt is {len(ids)} tokens, over {self.text_encoder_name}'s limit of {self.max_tokens}: only '{kept}' is used"
