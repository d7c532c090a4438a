"""Benchmark stage 03's embedding throughput: the real path against the model's bare speed.

- real path: crops read from disk by `CropDataset` (decode, resize, normalise) through a
  DataLoader into `embed_dataset` (channels_last, bf16 autocast on CUDA and on CPUs with native
  bf16, flip TTA, L2-normalise);
- loader alone: the same input pipeline with no model, to tell a slow loader from poor overlap;
- bare: the same model's forward passes (both flips when TTA is on) on random tensors of the same
  shape, already on the device: the ceiling the input pipeline can at best reach.
The ratio says how much of the model's speed the input pipeline keeps. Where the device runs bf16
(`inference.bf16_inference`), both paths are measured in float32 and in bf16 autocast, alternated
in one run, so the bf16 speed-up is a side-by-side ratio too. Crops come from
`--crops` (a crops.csv of stage 01) or are generated (random JPEGs) in a temporary folder.
Usage: python bench/bench_embed.py [--n 512] [--batch-size 64] [--workers 2] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whaleid.config import load_config  # noqa: E402
from whaleid.dataset import CropDataset, eval_transform  # noqa: E402
from whaleid.inference import (  # noqa: E402
    bf16_inference,
    chunk_loader,
    device_batches,
    embed_dataset,
    loader_chunk,
    resolve_device,
)
from whaleid.io import write_text  # noqa: E402
from whaleid.model import build_model  # noqa: E402


def make_crops(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """`n` random JPEG crops of `size` px (smooth noise, so they compress like photos)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        path = folder / f"crop_{i:05d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(str(path))
    return paths


@torch.no_grad()
def bare_loop(model: torch.nn.Module, n: int, batch: int, size: int, device: torch.device, flip: bool,
              amp: bool = True) -> float:
    """Images/s of forward passes on random device tensors, as embed_dataset runs them."""
    cuda = device.type == "cuda"
    model.eval().to(device, memory_format=torch.channels_last)  # as embed_dataset runs it
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)  # as the loader yields
    x = x.contiguous(memory_format=torch.channels_last)

    bf16 = bf16_inference(device, amp)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)
            if flip:
                model(torch.flip(x, dims=[3]))

    step()  # warm-up (cudnn autotune, allocator)
    if cuda:
        torch.cuda.synchronize()
    start, done = time.perf_counter(), 0
    while done < n:
        step()
        done += batch
    if cuda:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def real_path(model: torch.nn.Module, paths: list[str], args: argparse.Namespace, device: torch.device,
              amp: bool = True) -> tuple[float, float]:
    """Images/s of stage 03's path: disk -> CropDataset -> DataLoader -> embed_dataset, over the
    whole call and over the call less its wait for the first batch (the loader's fixed start:
    worker processes, and a chunk from each, paid once per pass whatever its length)."""
    dataset = CropDataset(paths, transform=eval_transform(args.image_size))
    embed_dataset(model, torch.utils.data.Subset(dataset, range(min(len(paths), args.batch_size))),
                  args.batch_size, 0, device, amp=amp, flip=args.flip)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats: dict = {}
    emb = embed_dataset(model, dataset, args.batch_size, args.workers, device, amp=amp, flip=args.flip, stats=stats)
    assert np.isfinite(emb).all(), "non-finite embeddings"
    # every image is embedded after the first batch came out of the loader: only the wait is fixed
    after_first = len(paths) / max(stats["seconds"] - stats["first_batch_s"], 1e-9)
    return len(paths) / stats["seconds"], after_first


def loader_only(paths: list[str], args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of the input pipeline alone: disk -> CropDataset -> DataLoader (stage 03's settings)
    -> the device, no model. Bounds the real path from above: when it is close to the real path's
    speed, the loader is what holds stage 03 back; when it is far above, the overlap is."""
    dataset = CropDataset(paths, transform=eval_transform(args.image_size))
    cuda = device.type == "cuda"
    loader = chunk_loader(dataset, args.batch_size, args.workers, pin_memory=cuda)  # as stage 03's
    start = time.perf_counter()
    for _ in device_batches(loader, device, args.batch_size):
        pass
    if cuda:
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="crops to embed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=0, help="0: config train.image_size")
    p.add_argument("--flip", default="average", choices=["none", "average", "separate"])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="alternated runs per precision (best kept)")
    p.add_argument("--crops", default="", help="a crops.csv of stage 01 to read crops from")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "embed.md"))
    args = p.parse_args()
    cfg = load_config()
    args.image_size = args.image_size or cfg.train.image_size
    device = resolve_device(args.device)
    model = build_model(cfg, pretrained=False)  # weights do not change the speed
    with tempfile.TemporaryDirectory() as tmp:
        if args.crops:
            paths = pd.read_csv(args.crops, dtype=str)["crop_path"].tolist()[: args.n]
            source = f"{len(paths)} crops of {args.crops}"
        else:
            paths = make_crops(Path(tmp), args.n, cfg.crop.image_size)
            source = f"{len(paths)} generated {cfg.crop.image_size}px JPEG crops"
        precisions = [("float32", False)] + ([("bf16 autocast", True)] if bf16_inference(device) else [])
        real: dict[str, float] = {}
        steady: dict[str, float] = {}
        bare: dict[str, float] = {}
        loader = 0.0
        for _ in range(args.repeats):  # alternated: drifts of a shared machine hit every precision alike
            loader = max(loader, loader_only(paths, args, device))
            for name, amp in precisions:
                whole, after_first = real_path(model, paths, args, device, amp)
                if whole > real.get(name, 0.0):  # both columns from the same (fastest) run
                    real[name], steady[name] = whole, after_first
                bare[name] = max(bare.get(name, 0.0),
                                 bare_loop(model, len(paths), args.batch_size, args.image_size, device, args.flip != "none", amp))
    rows = [f"| {name} | {real[name]:.1f} | {steady[name]:.1f} | {bare[name]:.1f} | {real[name] / bare[name]:.2f} | "
            f"{steady[name] / bare[name]:.2f} |" for name, _ in precisions]
    lines = [
        "# Stage 03 embedding throughput\n",
        f"Machine: {machine(device)}  ",
        f"Model {cfg.model.backbone} + GeM + neck ({cfg.model.embedding_size}-d), input {args.image_size}px, "
        f"batch {args.batch_size}, flip TTA {args.flip}, {args.workers} loader workers, device {device}; {source}; "
        f"best of {args.repeats} alternated runs per row.\n",
        "real: disk -> CropDataset -> DataLoader -> embed_dataset, the whole call; after 1st batch: the same run "
        "less its wait for the first batch (the loader's start, worker processes and a chunk from each, "
        "is paid once per pass: stage 03 embeds train and test in one pass per model), "
        "from the same run; "
        "bare: forward loop on random device tensors.\n",
        "| precision | real images/s | after 1st batch | bare images/s | real / bare | after 1st / bare |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    lines.append(f"\nLoader alone (disk -> CropDataset -> DataLoader in chunks of "
                 f"{loader_chunk(args.batch_size, args.workers)} -> device batches, no model, same workers): "
                 f"{loader:.1f} images/s.")
    if len(precisions) > 1:
        lines.append(f"\nbf16 / float32, real path: {real['bf16 autocast'] / real['float32']:.2f}x "
                     f"(stage 03 uses bf16 here: `embed.amp` true, the default).")
    else:
        lines.append("\nNo bf16 row: this device has no native bf16, so stage 03 embeds in float32.")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
