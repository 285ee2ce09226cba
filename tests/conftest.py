import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_prior_dir(tmp_path_factory):
    """A randomly initialised, small embedded-prior folder (same format as assets/prior): for
    tests of the machinery, not of what the shipped prior has learned."""
    from dreamfusion.prior.model import PriorConfig, save_prior_weights

    cfg = PriorConfig(block_out_channels=(16, 32, 32), attention_head_dim=4)
    torch.manual_seed(0)
    unet = cfg.unet()
    return save_prior_weights(unet.state_dict(), cfg, tmp_path_factory.mktemp("tiny_prior"))


@pytest.fixture
def fast_config(tiny_prior_dir):
    """A small, quick TrainConfig on the tiny prior."""
    from dreamfusion.field import FieldConfig
    from dreamfusion.guidance import GuidanceConfig
    from dreamfusion.trainer import TrainConfig

    return TrainConfig(steps=6, render_size=32, views=1, preview_every=0, field=FieldConfig(resolution=24),
                       guidance=GuidanceConfig(model=str(tiny_prior_dir)))
