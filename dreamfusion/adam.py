"""Adam for the scene's grids, written out: the same numbers as ``torch.optim.Adam(foreach=True)``
(no weight decay, no AMSGrad), bit for bit, and the same ``param_groups`` and ``state`` layout, so
checkpoints and the learning-rate schedule treat it as torch's.

Why not torch's own: the first ``torch.optim.Optimizer`` a process builds imports ``torch._dynamo``
(its ``add_param_group`` is wrapped to be skipped by the compiler), 1.1-1.5 s of a 2.5-s start-up
on a 2-core CPU, for a compiler this project never calls. The update is the one of
``torch/optim/adam.py``'s ``_multi_tensor_adam``, with the same foreach kernels in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class GridAdam:
    """Adam (Kingma & Ba 2015) over parameter groups: ``[{"params": [...], "lr": ..., **extra}]``; a
    group's own ``"eps"`` takes the place of the optimiser's.
    ``step()`` updates every parameter that has a gradient; ``state[p]`` holds ``step`` (a float32
    scalar tensor), ``exp_avg`` and ``exp_avg_sq``, as torch's Adam keeps them."""

    def __init__(self, groups: Iterable[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= 0.0):
            raise ValueError(f"need 0 <= betas < 1 and eps >= 0, got {betas} and {eps}")
        self.betas, self.eps = (float(beta1), float(beta2)), float(eps)
        self.param_groups: list[dict] = []
        for group in groups:
            group = dict(group)
            group["params"] = list(group["params"])
            if "lr" not in group or group["lr"] < 0:
                raise ValueError(f"each group needs a learning rate >= 0, got {group.get('lr')}")
            if group.get("eps", 0.0) < 0:
                raise ValueError(f"a group's eps must be >= 0, got {group['eps']}")
            self.param_groups.append(group)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:
                    self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            if steps[0].is_cpu:
                torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
            else:
                torch._foreach_add_(steps, 1)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            lr = group["lr"]
            step_size = [(lr / (1 - beta1 ** s.item())) * -1 for s in steps]
            correction2_sqrt = [(1 - beta2 ** s.item()) ** 0.5 for s in steps]
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, correction2_sqrt)
            torch._foreach_add_(denom, group.get("eps", self.eps))
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
