"""GridAdam (dreamfusion.adam) against torch's own Adam: the same numbers bit for bit, the same state."""

import sys

import pytest
import torch

from dreamfusion.adam import GridAdam


def _groups(seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(4, 5, 6, generator=g))
    b = torch.nn.Parameter(torch.randn(3, 7, generator=g))
    c = torch.nn.Parameter(torch.randn(2, generator=g))
    return [{"params": [a], "lr": 0.075, "base_lr": 0.075}, {"params": [b], "lr": 0.05, "base_lr": 0.05}, {"params": [c], "lr": 1e-3}]


def test_the_same_numbers_as_torch_adam_bit_for_bit():
    mine, theirs = _groups(0), _groups(0)
    ours = GridAdam(mine, betas=(0.9, 0.99), eps=1e-15)
    ref = torch.optim.Adam(theirs, betas=(0.9, 0.99), eps=1e-15, foreach=True)
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        for k, (gm, gt) in enumerate(zip(ours.param_groups, ref.param_groups, strict=True)):
            gm["lr"] = gt["lr"] = [0.075, 0.05, 1e-3][k] * (1.0 - step / 60)  # a schedule changes the rates between steps
            for pm, pt in zip(gm["params"], gt["params"], strict=True):
                grad = torch.randn(pm.shape, generator=g) * 10.0 ** (step % 5 - 2)
                pm.grad, pt.grad = grad.clone(), grad.clone()
        if step == 7:  # a group without gradients this step is left alone, as torch leaves it
            ours.param_groups[2]["params"][0].grad = ref.param_groups[2]["params"][0].grad = None
        ours.step()
        ref.step()
    for gm, gt in zip(ours.param_groups, ref.param_groups, strict=True):
        for pm, pt in zip(gm["params"], gt["params"], strict=True):
            assert torch.equal(pm, pt)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(ours.state[pm][key], ref.state[pt][key]), key
            assert ours.state[pm]["step"].dtype == ref.state[pt]["step"].dtype
    assert float(ours.state[ours.param_groups[2]["params"][0]]["step"]) == 29.0
    assert ours.param_groups[0]["base_lr"] == 0.075  # extra keys of a group are kept


def test_a_groups_own_eps_as_torch_adam_takes_it():
    """A group's "eps" replaces the optimiser's for that group only (the signed distance grid's),
    as in torch's Adam, bit for bit; a large one shrinks the steps of small gradients."""
    mine, theirs = _groups(3), _groups(3)
    mine[1]["eps"] = theirs[1]["eps"] = 0.03
    ours = GridAdam(mine, betas=(0.9, 0.99), eps=1e-15)
    ref = torch.optim.Adam(theirs, betas=(0.9, 0.99), eps=1e-15, foreach=True)
    plain = GridAdam(_groups(3), betas=(0.9, 0.99), eps=1e-15)
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        for opt_groups in zip(ours.param_groups, ref.param_groups, plain.param_groups, strict=True):
            grad = torch.randn(opt_groups[0]["params"][0].shape, generator=g) * 1e-3
            for group in opt_groups:
                group["params"][0].grad = grad.clone()
        for opt in (ours, ref, plain):
            opt.step()
    for gm, gt in zip(ours.param_groups, ref.param_groups, strict=True):
        assert torch.equal(gm["params"][0], gt["params"][0])
    start = _groups(3)
    moved = lambda opt, k: (opt.param_groups[k]["params"][0] - start[k]["params"][0]).abs().max().item()  # noqa: E731
    assert moved(ours, 1) < 0.2 * moved(plain, 1) and moved(ours, 0) == moved(plain, 0)
    with pytest.raises(ValueError):
        GridAdam([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1, "eps": -1.0}])


def test_zero_grad_and_bad_settings():
    opt = GridAdam(_groups(2))
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros_like(p))
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # nothing has a gradient: nothing moves, no state
    assert opt.state == {}
    for bad in (dict(betas=(1.0, 0.99)), dict(eps=-1.0)):
        with pytest.raises(ValueError):
            GridAdam(_groups(2), **bad)
    with pytest.raises(ValueError):
        GridAdam([{"params": [p]}])


def test_a_process_that_trains_never_imports_torch_dynamo():
    """The reason the class exists: torch's first Optimizer imports the compiler (1.1-1.5 s)."""
    import subprocess

    code = ("import sys, torch\nfrom dreamfusion.adam import GridAdam\n"
            "p = torch.nn.Parameter(torch.zeros(3)); o = GridAdam([{'params': [p], 'lr': 0.1}])\n"
            "p.grad = torch.ones(3); o.step(); torch.nn.utils.clip_grad_norm_([p], 1.0)\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
