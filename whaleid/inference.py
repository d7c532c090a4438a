"""Batched embedding of a dataset: device choice, bf16 autocast (CUDA, and CPUs with native bf16),
flip and shift TTA.

Used by stage 02 (validation), stage 03 (train/test embeddings) and the untrained-features floor.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from whaleid.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
FLIPS = ("none", "average", "separate")
# Embeddings wait on the device until this many bytes have gathered, then go to the host in one
# copy: a copy after every batch would wait for that batch's kernels, so the host could not queue
# the next batch meanwhile. 512-d float32 vectors fill it at ~130,000 images (one wait per pass);
# wide outputs (a flattened feature map, ~200 KB an image) every few batches, so the device never
# holds more than this much of them.
DEVICE_BUFFER_BYTES = 256 * 2**20


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; asking for `cuda` without one is a UserError."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; valid: {list(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no CUDA GPU is visible; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN
    emulates bf16, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def bf16_inference(device: torch.device, amp: bool = True) -> bool:
    """Whether inference on `device` runs under bf16 autocast when `amp` allows it: always on CUDA;
    on the CPU where it has native bf16 (right whale embedding 2.4x faster there at the same
    MAP@5). Training steps on the CPU stay float32: bf16 was not faster for Lite0's depthwise
    convolutions."""
    if not amp:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def loader_chunk(batch_size: int, workers: int) -> int:
    """Images a loader worker assembles at a time: about batch_size / workers, so that the first
    model batch waits for one such chunk from each worker, in parallel, instead of for one worker
    assembling a whole batch (1.45 s of a 10.8 s pass on an H100 at batch 256 with 14 workers)."""
    return batch_size if workers <= 1 else math.ceil(batch_size / workers)


def images_only(items: list) -> tuple[torch.Tensor]:
    """Collate only the images of (image, ...) items: the labels and indices are not needed to
    embed, and each collated tensor is one more shared-memory handle per chunk in flight."""
    return (default_collate([item[0] for item in items]),)


def chunk_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of `loader_chunk` images an item, in dataset order, for `device_batches`."""
    chunk = loader_chunk(batch_size, workers)
    return DataLoader(
        dataset, batch_size=chunk, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, collate_fn=images_only,
        # as many images queued ahead as whole batches of two per worker would hold
        **({"prefetch_factor": 2 * math.ceil(batch_size / chunk)} if workers > 0 else {}),
    )


def device_batches(chunks: Iterable, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """The loader's chunks of images, copied to `device` and joined into batches of `batch_size` in
    dataset order (the last may be shorter): the batches a loader of that batch size would give.
    A batch may be a view shared with the next batch's first images: read it, do not write it."""
    parts: list[torch.Tensor] = []
    have = 0
    for images, *_ in chunks:
        parts.append(images.to(device, non_blocking=True))
        have += len(images)
        while have >= batch_size:
            joined = parts[0] if len(parts) == 1 else torch.cat(parts)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            parts, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


def shifted_crops(x: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """The five (H - 2 shift)-px crops of a batch: centre, then the four corners ([x] for shift 0)."""
    if shift <= 0:
        return [x]
    h, w = x.shape[-2] - 2 * shift, x.shape[-1] - 2 * shift
    if h < 1 or w < 1:
        raise ValueError(f"shift {shift} leaves no crop of a {tuple(x.shape[-2:])} image")
    corners = [(shift, shift), (0, 0), (0, 2 * shift), (2 * shift, 0), (2 * shift, 2 * shift)]
    return [x[..., top : top + h, left : left + w] for top, left in corners]


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    amp: bool = True,
    flip: str = "none",
    desc: str = "embed",
    shift: int = 0,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize: bool = True,
    stats: dict | None = None,
) -> np.ndarray:
    """L2-normalised float32 embeddings in dataset order: (N, D), or (N, 2, D) for flip="separate".

    flip: "none"; "average" = mean of the original and horizontally flipped embeddings (then
    renormalised), the 1st-place TTA; "separate" keeps both. shift > 0: the dataset's images are
    `2 shift` px larger than the model's input, and each orientation is the mean of the five
    crops `shifted_crops` cuts (centre and corners), renormalised. `features` replaces `model`'s
    forward (e.g. `model.pooled`, the backbone features without the neck); normalize=False returns
    its outputs as they are (flip "none" and shift 0 only: there is nothing to average). The model
    is left in eval mode. Loader workers assemble chunks of `loader_chunk` images, joined on the
    device into the model's batches. A `stats` dict receives `first_batch_s` (from the loader's
    creation to the first model batch: worker start and a chunk from each worker) and `seconds` (from the
    loader's creation to the embeddings on the host, the device's work included), so a benchmark
    can tell that fixed start from the steady rate.
    """
    if flip not in FLIPS:
        raise UserError(f"unknown flip mode {flip!r}; valid: {list(FLIPS)}")
    if not normalize and (flip != "none" or shift):
        raise ValueError("normalize=False needs flip='none' and shift=0")
    forward = model if features is None else features
    cuda = device.type == "cuda"
    bf16 = bf16_inference(device, amp)
    model.eval().to(device, memory_format=torch.channels_last)  # faster on CUDA and on the CPU (oneDNN)
    loader = chunk_loader(dataset, batch_size, workers, pin_memory=cuda)
    out: list[torch.Tensor] = []  # on the host
    pending: list[torch.Tensor] = []  # on the device, up to DEVICE_BUFFER_BYTES
    pending_bytes = 0
    start, seen = time.perf_counter(), 0
    bar = tqdm(loader, desc=desc, unit="chunk", leave=False, dynamic_ncols=True)
    first = None
    for x in device_batches(bar, device, batch_size):
        if first is None:
            first = time.perf_counter() - start
        x = x.contiguous(memory_format=torch.channels_last)
        views = []
        for flipped in (False, True) if flip != "none" else (False,):
            crops = shifted_crops(torch.flip(x, dims=[3]) if flipped else x, shift)
            # the five shifted crops go through the model as one batch (one call, better GPU use)
            batch_in = crops[0] if len(crops) == 1 else torch.cat(crops).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                unit = forward(batch_in).float()
            if not normalize:
                views.append(unit)
                continue
            unit = F.normalize(unit, dim=1)
            views.append(F.normalize(unit.view(len(crops), len(x), -1).sum(0), dim=1))
        if flip == "average":
            batch = F.normalize(views[0] + views[1], dim=1)
        elif flip == "separate":
            batch = torch.stack(views, dim=1)
        else:
            batch = views[0]
        pending.append(batch)
        pending_bytes += batch.numel() * batch.element_size()
        if pending_bytes >= DEVICE_BUFFER_BYTES:
            out.append(torch.cat(pending).cpu())
            pending, pending_bytes = [], 0
        seen += len(x)
        # on CUDA the rate of batches queued, which runs at most a few batches ahead of the device
        bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.0f}")
    if pending:
        out.append(torch.cat(pending).cpu())
    result = (torch.cat(out).numpy().astype(np.float32, copy=False) if out
              else np.zeros((0, 0), dtype=np.float32))
    if stats is not None:  # after the .cpu() above, which waits for the device's last batch
        stats.update(first_batch_s=first or 0.0, seconds=time.perf_counter() - start)
    return result
