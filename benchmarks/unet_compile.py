"""One call of the embedded prior's U-Net at the shapes a training step gives it, three ways: eager,
the frozen TorchScript graph the guidance uses, and ``torch.compile`` (Inductor, optionally with
``freezing``); the compile's seconds and its largest difference from eager.

    python benchmarks/unet_compile.py [--threads 2 --batch 8 --dtype bfloat16 --freezing]

``--batch 8``: four views a step, both classifier-free guidance branches in one batch.
Findings: docs/speed.md ("Tried").
"""

from __future__ import annotations

import argparse
import time

import torch

from dreamfusion.prior.model import _PositionalUNet, load_unet, unet_input_dims


def median_ms(fn, inputs: tuple, n: int) -> float:  # noqa: ANN001 - any callable module
    for _ in range(5):
        fn(*inputs)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--freezing", action="store_true", help="Inductor's freezing (weights as constants, prepacked convolutions)")
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    unet, cfg = load_unet()
    unet = torch.nn.Module.to(unet, dtype)
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, cfg.image_size
    class_dim, channels = unet_input_dims(cfg)
    inputs = (torch.randn(b, channels, s, s, generator=g).to(dtype), torch.randint(20, 980, (b,), generator=g),
              torch.randn(b, cfg.max_tokens, cfg.text_dim, generator=g).to(dtype), torch.ones(b, cfg.max_tokens, dtype=torch.long),
              torch.randn(b, class_dim, generator=g).to(dtype))
    module = _PositionalUNet(unet).eval()
    with torch.no_grad():
        reference = module(*inputs).float()
        print(f"{args.dtype}, batch {b} at {s} px, {args.threads} threads, median of {args.iters}:")
        print(f"  eager: {median_ms(module, inputs, args.iters):.1f} ms")
        graph = torch.jit.freeze(torch.jit.trace(module, inputs, check_trace=False))
        print(f"  frozen TorchScript graph: {median_ms(graph, inputs, args.iters):.1f} ms")
        import torch._inductor.config as inductor_config

        inductor_config.freezing = args.freezing
        t0 = time.perf_counter()
        compiled = torch.compile(module, dynamic=False)
        diff = (compiled(*inputs).float() - reference).abs().max().item()
        print(f"  compiled in {time.perf_counter() - t0:.0f} s (largest difference from eager {diff:.3g})")
        print(f"  torch.compile{' (freezing)' if args.freezing else ''}: {median_ms(compiled, inputs, args.iters):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
