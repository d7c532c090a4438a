"""Memory format on the CPU: NCHW (contiguous) against NHWC (channels_last), side by side.

Times the embedding model of the config (backbone + pooling + neck) in training steps (forward,
backward, AdamW step; the ArcFace heads are left out: a matrix product that does not depend on
the memory format) and in inference, alternating the two formats over `--rounds` rounds in one
run so that a noisy machine affects both alike. Stage 02 trains NHWC when
`train.channels_last` is true (the default), and stages 01 and 03 always infer in NHWC.

    python bench/bench_memory_format.py --config configs/cpu.yaml --config configs/rightwhale.yaml
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whaleid.config import load_config  # noqa: E402
from whaleid.io import write_text  # noqa: E402
from whaleid.model import build_model  # noqa: E402

FORMATS = {"NCHW (contiguous)": torch.contiguous_format, "NHWC (channels_last)": torch.channels_last}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="overlay (repeatable)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE override (repeatable)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps per format and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_format.md"))
    args = p.parse_args()
    cfg = load_config(args.config, args.sets)
    torch.manual_seed(0)
    size = cfg.train.image_size
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, size, size)
    train_s = {name: 0.0 for name in FORMATS}
    eval_s = {name: 0.0 for name in FORMATS}

    def train_step(batch: torch.Tensor) -> None:
        model(batch).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.rounds):
        for name, fmt in FORMATS.items():
            model.to(memory_format=fmt)
            batch = x.contiguous(memory_format=fmt)
            model.train()
            train_step(batch)  # warm-up (oneDNN primitives for this format)
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(batch)
            train_s[name] += time.perf_counter() - start
            model.eval()
            with torch.inference_mode():
                model(batch)
                start = time.perf_counter()
                for _ in range(args.steps):
                    model(batch)
            eval_s[name] += time.perf_counter() - start
    n = args.rounds * args.steps * args.batch
    base = next(iter(FORMATS))
    lines = [
        "# Memory format on the CPU (stage 02 training step, stage 03 inference)",
        "",
        f"- command: `python bench/bench_memory_format.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}",
        f"- model: {cfg.model.backbone}, pool {cfg.model.pool}, {size} px, batch {args.batch}; "
        f"{args.rounds} rounds x {args.steps} steps per format, alternated",
        "",
        "| memory format | train images/s | vs NCHW | inference images/s | vs NCHW |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in FORMATS:
        lines.append(f"| {name} | {n / train_s[name]:.1f} | {train_s[base] / train_s[name]:.2f}x | "
                     f"{n / eval_s[name]:.1f} | {eval_s[base] / eval_s[name]:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    write_text(Path(args.out), table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
