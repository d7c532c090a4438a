"""Training throughput: the real stage-02 loop against a bare loop of the same model, side by side.

`real`: DataLoader + crop decoding + augmentation + model + ArcFace heads + optimiser step, via
`train.train_step` on the crops of stages 00/01. `bare`: the same model, heads and optimiser on
random tensors already on the device. Their ratio shows how much the input pipeline costs.

    python bench/bench_train.py --steps 20 --set train.batch_size=32
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whaleid.cli import build_parser  # noqa: E402
from whaleid.config import Config, load_config  # noqa: E402
from whaleid.dataset import CropDataset, train_transform  # noqa: E402
from whaleid.distributed import init_runtime  # noqa: E402
from whaleid.errors import UserError  # noqa: E402
from whaleid.io import write_text  # noqa: E402
from whaleid.train import (  # noqa: E402
    make_optimizer,
    make_scheduler,
    make_splits,
    prepare_model,
    read_inputs,
    seed_everything,
    train_loader,
    train_step,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.md"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(batches, step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step(batch)` after `warmup` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(it))
    _sync(device)
    return time.perf_counter() - start


def _forever(loader):
    while True:
        yield from loader


def bench(cfg: Config, steps: int, warmup: int) -> str:
    """Run both loops and return the markdown table."""
    rt = init_runtime(cfg)
    if rt.world > 1:
        raise UserError("run the benchmark in a single process, not under torchrun")
    seed_everything(cfg.seed)
    catalogue, crops, encoders = read_inputs(cfg)
    splits = make_splits(cfg, catalogue, crops, encoders)
    dataset = CropDataset(
        splits.train["crop_path"], splits.train["label"], splits.train["species_label"],
        train_transform(cfg.train.image_size, cfg.train.aug),
    )
    loader, _ = train_loader(cfg, dataset, rt)
    model, heads, net = prepare_model(cfg, rt, splits, encoders)
    optimizer = make_optimizer(cfg, model, heads)
    scheduler = make_scheduler(optimizer, 0, 10**9)
    net.train()
    batch = loader.batch_size

    def step(b):
        train_step(cfg, net, b, optimizer, scheduler, rt, True, "benchmark")

    size = cfg.train.image_size
    fake = (
        torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=rt.device),  # as the loader yields
        torch.randint(0, max(1, len(encoders["individual_id"])), (batch,), device=rt.device),
        torch.randint(0, max(1, len(encoders["species"])), (batch,), device=rt.device),
    )
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    bare_s = time_steps(_forever([fake]), step, steps, warmup, rt.device)
    real_s = time_steps(_forever(loader), step, steps, warmup, rt.device)
    peak = (f"Peak GPU memory allocated: {torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB."
            if rt.device.type == "cuda" else "")
    real, bare = steps * batch / real_s, steps * batch / bare_s
    return "\n".join([
        "# Training throughput (stage 02)",
        "",
        f"Device: {device_name(rt.device)}. Backbone {cfg.model.backbone}, image {size} px, batch {batch}, "
        f"{steps} timed steps after {warmup} warm-up, workers {cfg.train.workers}, "
        f"amp {cfg.train.amp and rt.device.type == 'cuda'}, {len(dataset)} training crops.",
        "",
        "| loop | images/s | ms/step |",
        "|---|---:|---:|",
        f"| real (DataLoader + augmentation + model + loss + step) | {real:.1f} | {1000 * real_s / steps:.0f} |",
        f"| bare (random tensors on the device, same model + loss + step) | {bare:.1f} | {1000 * bare_s / steps:.0f} |",
        "",
        f"real / bare = {real / bare:.2f}",
        "",
        *([peak, ""] if peak else []),
    ])


def main() -> None:
    p = build_parser(__doc__)
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (cudnn autotune, allocator)")
    p.add_argument("--out", default=str(RESULTS), help="results file")
    args = p.parse_args()
    try:
        table = bench(load_config(args.config, args.sets), args.steps, args.warmup)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(table)
    write_text(Path(args.out), table)


if __name__ == "__main__":
    main()
