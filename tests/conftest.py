import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
if "DREAMFUSION_CACHE" not in os.environ:  # traced U-Net graphs: one folder for the session, none left in the home directory
    import atexit
    import shutil
    import tempfile

    os.environ["DREAMFUSION_CACHE"] = tempfile.mkdtemp(prefix="dreamfusion-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DREAMFUSION_CACHE"], True)

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


#: where the tests marked ``device`` run: cpu unless DREAMFUSION_TEST_DEVICE says otherwise
#: (benchmarks/gpu_check.py runs them with cuda)
TEST_DEVICE = os.environ.get("DREAMFUSION_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on DREAMFUSION_TEST_DEVICE (cpu by default; benchmarks/gpu_check.py: cuda)")


@pytest.fixture
def device():
    """The device of a ``device``-marked test; a CUDA device asked for on a machine without one is a failure, not a skip."""
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"DREAMFUSION_TEST_DEVICE={TEST_DEVICE} but torch sees no CUDA GPU")
    return torch.device(TEST_DEVICE)
