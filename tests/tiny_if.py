"""A tiny, randomly initialised DeepFloyd IF stage-I pipeline saved in the diffusers layout, for
tests that must run offline: the same folder structure and the same kinds of components as
DeepFloyd/IF-I-XL-v1.0 (T5 encoder, a U-Net with T5-projected cross-attention and a text-pooled
time embedding predicting noise and variance, a cosine DDPM schedule), a few thousand weights. The
T5 tokenizer is built from a word list (no SentencePiece model, no download)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

WORDS = ("a", "red", "blue", "cube", "sphere", "the", "cat", "and", "dog", "front", "side", "back", "overhead", "view")


def build_tokenizer() -> object:
    """A T5 (Unigram) tokenizer over whole words with SentencePiece's word marker, plus single
    characters for anything else; ``</s>`` ends every text, ``<pad>`` pads it, as T5's does."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",.'-"] + [("\u2581", -6.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)


def build_tiny_if(folder: Path, seed: int = 0) -> Path:
    """Save a tiny IF stage-I pipeline (U-Net sample_size 16: 16 x 16 images) to ``folder``."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                           relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                                           eos_token_id=1))
    # IF-I's architecture in miniature (diffusers' own IF pipeline tests use the same block kinds)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=32, encoder_hid_dim=16,
        attention_head_dim=4, addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu",
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                              sample_max_value=1.5, clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon", variance_type="learned_range")
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
