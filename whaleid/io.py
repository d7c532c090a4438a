"""Atomic artifact writing, fingerprints and the per-stage output folders.

Every artifact is written to a temporary file in the same folder and renamed into place, so a
stage killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from whaleid.config import Config, dump_config
from whaleid.errors import UserError

STAGE_DIRS = {
    "prepare": "00_prepare",
    "crop": "01_crops",
    "train": "02_train",
    "embed": "03_embed",
    "submit": "04_submit",
}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; artifacts get the usual umask-based mode instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def torch_save(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def stage_dir(cfg: Config, stage: str) -> Path:
    """The output folder of a stage (created), e.g. outputs/02_train."""
    if stage not in STAGE_DIRS:
        raise KeyError(f"unknown stage {stage!r}; valid: {sorted(STAGE_DIRS)}")
    out = Path(cfg.paths.outputs) / STAGE_DIRS[stage]
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_resolved_config(cfg: Config, folder: str | Path) -> Path:
    """Write the resolved config beside a stage's artifacts."""
    path = Path(folder) / "config.resolved.yaml"
    write_text(path, dump_config(cfg))
    return path


def fingerprint_files(paths: list[str | Path]) -> str:
    """A short hash of file names, sizes and modification times (cheap staleness check)."""
    h = hashlib.sha1()
    for p in sorted(str(p) for p in paths):
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def fingerprint_config(section: Any) -> str:
    """A short hash of a config section's resolved values."""
    return hashlib.sha1(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


def require(path: str | Path, made_by: str) -> Path:
    """Return `path` if it exists, else stop with a sentence naming the stage that makes it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing input {path}: run {made_by} first")
    return path
