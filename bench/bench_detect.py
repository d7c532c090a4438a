"""Benchmark of stage 01: box quality on the demo test images, and crop throughput.

(1) The built-in detector, trained on the demo set's TRAIN boxes only, and the training-free
fallback, each scored on the demo TEST images against the true boxes: mean IoU and the share
of images with IoU >= 0.5 (targets for the detector: >= 0.80 and >= 97%).
(2) Images per second for decode + crop + resize + save (the stage's worker, `crop.workers`
processes) beside plain decode + save of the same files, in one run, and their ratio.

Prints a table and writes it to bench/results/detect.md with the machine named.
Usage: python bench/bench_detect.py [--config X] [--set crop.detector.epochs=20]
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whaleid import demo_data, detect, detector  # noqa: E402
from whaleid.boxes import BOX_COLUMNS, fallback_box, iou  # noqa: E402
from whaleid.cli import build_parser  # noqa: E402
from whaleid.config import Config, load_config  # noqa: E402
from whaleid.errors import UserError  # noqa: E402
from whaleid.images import image_size, read_image, write_jpeg  # noqa: E402
from whaleid.inference import resolve_device  # noqa: E402
from whaleid.io import write_bytes, write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "detect.md"


def demo_catalogue(demo: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A stage-00-like catalogue of the demo images (image, split, path, width, height) and the true boxes."""
    truth = pd.read_csv(demo / "boxes.csv", dtype={"image": str})
    truth["path"] = [str((demo / f"{s}_images" / i).resolve()) for i, s in zip(truth["image"], truth["split"])]
    sizes = [image_size(p) for p in truth["path"]]
    truth["width"], truth["height"] = [s[0] for s in sizes], [s[1] for s in sizes]
    return truth[["image", "split", "path", "width", "height"]], truth


def score(pred: list, truth: np.ndarray) -> dict:
    """Mean IoU and share with IoU >= 0.5; a missing box scores 0."""
    boxes = np.array([p[0] if p is not None and p[0] is not None else (0, 0, 0, 0) for p in pred], np.float64)
    ious = iou(boxes, truth)
    return {"mean_iou": float(ious.mean()), "iou50": float((ious >= 0.5).mean()), "n": len(ious)}


def box_quality(cfg: Config, demo: Path, work: Path) -> dict:
    """Detector (trained on demo train boxes) and fallback, scored on the demo test images."""
    cat, truth = demo_catalogue(demo)
    cfg.crop.detector["train_boxes"] = str(demo / "boxes.csv")   # training_boxes keeps its train rows only
    t0 = time.perf_counter()
    det, summary = detector.ensure(cfg, cat, work / "detector.pt")
    train_s = time.perf_counter() - t0
    test = truth[truth["split"] == "test"].reset_index(drop=True)
    want = test[BOX_COLUMNS].to_numpy(np.float64)
    t0 = time.perf_counter()
    predicted = detector.predict(det, test["path"].tolist(), cfg)
    det_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fallback = [fallback_box(read_image(p)[0]) for p in test["path"]]
    fb_s = time.perf_counter() - t0
    return {
        "detector": {**score(predicted, want), "img_s": len(test) / det_s},
        "fallback": {**score(fallback, want), "img_s": len(test) / fb_s},
        "train": {"seconds": train_s, "trained_now": summary["trained_now"], "n_train": summary["n_train"],
                  "n_val": summary["n_val"], "val_iou": summary["val_iou"]},
    }


def plain_copy(task: dict) -> dict:
    """The baseline worker: decode and re-save the whole image, nothing else."""
    rgb, reason = read_image(task["path"])
    if rgb is None:
        return {"error": reason}
    write_bytes(task["crop_path"], write_jpeg(task["crop_path"], rgb, task["settings"]["jpeg_quality"]))
    return {}


def throughput(cfg: Config, demo: Path, work: Path) -> dict:
    """Images/s of the stage's crop worker vs plain decode + save, same files, same processes."""
    _, truth = demo_catalogue(demo)
    settings = detect.crop_settings(cfg)
    tasks = {name: [{"path": p, "crop_path": str(work / name / f"{i}.jpg"), "method": "import",
                     "box": tuple(b), "conf": 1.0, "settings": settings}
                    for i, (p, b) in enumerate(zip(truth["path"], truth[BOX_COLUMNS].to_numpy(float)))]
             for name in ("crop", "plain")}
    with detect.get_context("fork").Pool(max(1, cfg.crop.workers)) as pool:
        rates = {}
        for name, worker in (("plain", plain_copy), ("crop", detect.crop_one)):
            t0 = time.perf_counter()
            pool.map(worker, tasks[name], chunksize=detect.CHUNK)
            rates[name] = len(tasks[name]) / (time.perf_counter() - t0)
    return {"images": len(truth), "workers": max(1, cfg.crop.workers), "crop_img_s": rates["crop"],
            "plain_img_s": rates["plain"], "ratio": rates["crop"] / rates["plain"]}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def table(q: dict, t: dict, cfg: Config) -> str:
    d, f, tr = q["detector"], q["fallback"], q["train"]
    return "\n".join([
        "# Stage 01 benchmark (bench/bench_detect.py)", "",
        f"Machine: {machine()}. Device: {resolve_device(cfg.device)}. Demo set: {cfg.paths.demo}.", "",
        f"## Boxes on the demo test images ({d['n']} images; targets for the detector: mean IoU >= 0.80, "
        "IoU >= 0.5 on >= 97%)", "",
        "| method | mean IoU | IoU >= 0.5 | images/s |", "|---|---|---|---|",
        f"| detector (built-in, trained on {tr['n_train']} demo train boxes) | {d['mean_iou']:.3f} | "
        f"{100 * d['iou50']:.1f}% | {d['img_s']:.1f} |",
        f"| fallback (training-free segmentation) | {f['mean_iou']:.3f} | {100 * f['iou50']:.1f}% | {f['img_s']:.1f} |",
        "",
        f"Detector: {cfg.crop.detector.backbone} frozen + box head, input {cfg.crop.detector.image_size}px, "
        f"{cfg.crop.detector.epochs} epochs; held-out validation IoU {tr['val_iou']:.3f} ({tr['n_val']} boxes); "
        f"{'trained in' if tr['trained_now'] else 'loaded (trained earlier) in'} {tr['seconds']:.0f}s.", "",
        f"## Crop throughput ({t['images']} demo images, {t['workers']} worker processes)", "",
        "| work per image | images/s |", "|---|---|",
        f"| decode + crop + resize to {cfg.crop.image_size} + JPEG save | {t['crop_img_s']:.1f} |",
        f"| decode + JPEG save of the full image (baseline) | {t['plain_img_s']:.1f} |",
        f"| ratio crop / baseline | {t['ratio']:.2f} |", "",
    ])


def main() -> None:
    args = build_parser(__doc__.splitlines()[0]).parse_args()
    try:
        cfg = load_config(args.config, args.sets)
        demo = Path(cfg.paths.demo)
        if not (demo / "boxes.csv").is_file():
            demo_data.generate(cfg, demo)
        work = Path(cfg.paths.outputs) / "bench_detect"
        work.mkdir(parents=True, exist_ok=True)
        quality = box_quality(cfg, demo, work)
        scratch = Path(tempfile.mkdtemp(prefix="bench_detect_"))
        try:
            speed = throughput(cfg, demo, scratch)
        finally:
            shutil.rmtree(scratch)
    except UserError as err:
        sys.exit(f"error: {err}")
    text = table(quality, speed, cfg)
    print(text)
    write_text(RESULTS, text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
