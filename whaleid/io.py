"""Atomic artifact writing, fingerprints and the per-stage output folders.

Every artifact is written to a temporary file in the same folder and renamed into place, so a
stage killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
# What stage 03 writes for stage 04; its report.json records their digests (`check_outputs`).
EMBED_FILES = ("train_emb.npy", "train_index.csv", "test_emb.npy", "test_index.csv",
               "fold_train_emb.npy", "fold_train_index.csv", "fold_test_emb.npy", "fold_test_index.csv",
               "test_logits.npz", "train_logits.npz")


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


def file_digest(path: str | Path) -> str:
    """A content hash of a file (16 hex digits): unlike `fingerprint_files`, a file rewritten
    with the same bytes (a stage rerun that changed nothing) keeps its digest."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stage_inputs_record(paths: Iterable[str | Path], outputs: str | Path) -> dict[str, str]:
    """{path: content digest} of the files a stage read, stored as `input_files` in its report.json
    so a later stage can tell (`check_fresh`) whether they changed since. Paths below `outputs`
    (`paths.outputs`) are stored relative to it, so a moved or copied outputs folder still checks."""
    root = Path(outputs).resolve()
    record = {}
    for p in paths:
        path = Path(p).resolve()
        record[str(path.relative_to(root)) if path.is_relative_to(root) else str(path)] = file_digest(path)
    return record


def check_fresh(report_path: str | Path, made_by: str) -> list[str]:
    """Warn about inputs of an upstream stage that changed after it ran: compares the digests in
    its report.json (`input_files`) with the files now. Prints and returns one line per file.

    The report lies in `<outputs>/<stage folder>/`, so relative paths are read below `<outputs>`.
    Example: stage 03 checks 02_train/report.json; if crops.csv changed since the checkpoint
    was trained, the embeddings would come from a model trained on other crops.
    """
    report_path = Path(report_path)
    if not report_path.is_file():
        return []
    recorded = read_json(report_path).get("input_files") or {}
    stage = report_path.parent.name
    stale = []
    for name, digest in recorded.items():
        path = report_path.parent.parent / name  # an absolute `name` stays as it is
        if not path.is_file():
            stale.append(f"{path} no longer exists, but {stage} was made from it: rerun {made_by}")
        elif file_digest(path) != digest:
            stale.append(f"{path} changed after {stage} was made from it "
                         f"(digests in {report_path}): rerun {made_by} and the stages after it")
    for line in stale:
        print(f"warning: stale input: {line}")
    return stale


def check_outputs(report_path: str | Path, names: Iterable[str], made_by: str) -> dict:
    """A finished stage's report.json, checked against the files beside it: each file its
    `output_files` records must be there with the recorded digest, and none of `names` may be
    there unrecorded. A run killed while writing leaves no report.json (it is deleted first and
    written last), so a mix of two runs' files is refused, never read. Returns the report."""
    report_path = Path(report_path)
    folder = report_path.parent
    if not report_path.is_file():
        raise UserError(f"{report_path} is missing: {made_by} did not finish writing {folder} "
                        f"(a killed run leaves a mix of old and new files); rerun {made_by}")
    report = read_json(report_path)
    recorded = report.get("output_files")
    if recorded is None:  # written before reports listed their outputs: nothing to check against
        return report
    for name, digest in recorded.items():
        path = folder.parent / name  # an absolute `name` stays as it is
        if not path.is_file() or file_digest(path) != digest:
            state = "missing" if not path.is_file() else "not the file"
            raise UserError(f"{path} is {state} that {made_by} wrote (digests in {report_path}): rerun {made_by}")
    listed = {(folder.parent / name).resolve() for name in recorded}
    for name in names:
        if (folder / name).is_file() and (folder / name).resolve() not in listed:
            raise UserError(f"{folder / name} was not written by the {made_by} run that wrote {report_path}: "
                            f"rerun {made_by}")
    return report


def require(path: str | Path, made_by: str) -> Path:
    """Return `path` if it exists, else stop with a sentence naming the stage that makes it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing input {path}: run {made_by} first")
    return path


def load_array(path: str | Path, made_by: str) -> Any:
    """`np.load` of a stage's .npy/.npz artifact (no pickles); a missing, truncated or corrupt
    file stops with a sentence naming it and the stage that rewrites it. An .npz is read whole."""
    path = require(path, made_by)
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {key: data[key] for key in data.files}
        return data
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}): rerun {made_by}") from err
