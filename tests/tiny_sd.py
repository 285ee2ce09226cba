"""A tiny, randomly initialised Stable Diffusion pipeline saved in the diffusers layout, for tests
that must run offline: the same folder structure a real checkpoint has, a few thousand weights."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch


def write_vocab(folder: Path) -> tuple[Path, Path]:
    """A CLIP-style BPE vocabulary: bytes-level letters, their word-final ``</w>`` forms, a few
    merges and the two special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase) + list(",.!'-0123456789")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = ["t h", "th e</w>", "a n", "an d</w>", "c u", "cu b", "cub e</w>"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Save a tiny SD pipeline (UNet sample_size 8, VAE factor 2: 16x16 images) to ``folder``."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vocab_file, merges_file = write_vocab(folder.parent / (folder.name + "-vocab"))
    vocab = json.loads(vocab_file.read_text())
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab_file.parent), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=16,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    # real SD 1.x/2.x repositories ship the slow-tokenizer files only: mirror that layout
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for f in (vocab_file, merges_file):
        shutil.copy(f, folder / "tokenizer" / f.name)
    return folder
