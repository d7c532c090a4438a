"""The config is strict: overlays deep-merge, overrides are type-checked, unknown keys are errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from whaleid.config import DEFAULT_CONFIG, ROOT, load_config
from whaleid.errors import UserError


def _overlay(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_match_the_yaml_file() -> None:
    cfg = load_config()
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert cfg.to_dict() == raw
    assert cfg.train.epochs == raw["train"]["epochs"]
    assert cfg.prepare.n_folds == raw["prepare"]["n_folds"]


def test_overlay_keeps_sibling_keys_of_a_block(tmp_path: Path) -> None:
    defaults = load_config()
    cfg = load_config(overlays=[_overlay(tmp_path, {"train": {"epochs": 2, "aug": {"hflip": 0.0}}})])
    assert cfg.train.epochs == 2
    assert cfg.train.aug.hflip == 0.0
    assert cfg.train.batch_size == defaults.train.batch_size
    assert cfg.train.aug.rotate == defaults.train.aug.rotate
    assert cfg.model == defaults.model


def test_set_overrides_after_overlays(tmp_path: Path) -> None:
    cfg = load_config(overlays=[_overlay(tmp_path, {"train": {"epochs": 2}})], sets=["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert isinstance(cfg.train.epochs, int)


def test_int_is_accepted_for_a_float() -> None:
    cfg = load_config(sets=["prepare.new_share=0", "train.lr_backbone=1"])
    assert cfg.prepare.new_share == 0.0 and isinstance(cfg.prepare.new_share, float)
    assert isinstance(cfg.train.lr_backbone, float)


@pytest.mark.parametrize("expr", ["train.epochs=abc", "train.epochs=true", "train.epochs=2.5", "train.amp=1"])
def test_wrong_type_names_the_key(expr: str) -> None:
    key = expr.split("=")[0]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(sets=[expr])


@pytest.mark.parametrize("expr", ["train.epochs=null", "train.epochs=~", "train.lr_backbone=null",
                                  "crop.sources=null", "train.amp=null"])
def test_null_is_refused_where_the_default_is_not_null(expr: str) -> None:
    key = re.escape(expr.split("=")[0])
    with pytest.raises(UserError, match=f"{key}.*got null"):
        load_config(sets=[expr])


def test_null_is_refused_in_an_overlay(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"train\.epochs"):
        load_config(overlays=[_overlay(tmp_path, {"train": {"epochs": None}})])


def test_float_keys_take_exponents_yaml_reads_as_strings(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `1e-3` as a string; a float key takes it as 0.001."""
    assert yaml.safe_load("1e-3") == "1e-3"
    cfg = load_config(sets=["train.lr_backbone=1e-3"])
    assert cfg.train.lr_backbone == 0.001 and isinstance(cfg.train.lr_backbone, float)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train:\n  lr_backbone: 2E-4\n")
    assert load_config(overlays=[overlay]).train.lr_backbone == 0.0002
    with pytest.raises(UserError, match=r"train\.lr_backbone"):
        load_config(sets=["train.lr_backbone=fast"])
    with pytest.raises(UserError, match=r"train\.epochs"):
        load_config(sets=["train.epochs=1e3"])       # int keys stay strict


def test_float_list_items_are_checked_like_float_keys() -> None:
    assert load_config(sets=["rerank.weights=[0, 1e-3, 0.5]"]).rerank.weights == [0.0, 0.001, 0.5]
    with pytest.raises(UserError, match=r"rerank\.weights\[1\].*'heavy'"):
        load_config(sets=["rerank.weights=[0.0, heavy]"])


def test_text_keys_take_what_yaml_reads_as_numbers_or_dates() -> None:
    cfg = load_config(sets=["paths.outputs=2024", "paths.labels=2024-06-01"])
    assert (cfg.paths.outputs, cfg.paths.labels) == ("2024", "2024-06-01")
    with pytest.raises(UserError, match=r"paths\.outputs.*got True"):  # yes/no stay an error
        load_config(sets=["paths.outputs=yes"])


def test_one_line_keeps_a_message_whole_and_unwraps_a_worker_traceback() -> None:
    from whaleid.cli import one_line

    assert one_line(UserError("building the wheel failed:\nerror: bad pyproject")) == (
        "building the wheel failed:\nerror: bad pyproject")
    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1\nwhaleid.errors.UserError: crop a.jpg does not decode')
    assert one_line(UserError(wrapped)) == "crop a.jpg does not decode"


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(UserError) as err:
        load_config(sets=["train.epoch=3"])
    msg = str(err.value)
    assert "train.epoch" in msg and "epochs" in msg and "batch_size" in msg


def test_unknown_section() -> None:
    with pytest.raises(UserError, match="'nope'") as err:
        load_config(sets=["nope.x=1"])
    assert "train" in str(err.value)


def test_unknown_key_in_overlay(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"prepare\.n_fold"):
        load_config(overlays=[_overlay(tmp_path, {"prepare": {"n_fold": 3}})])


def test_section_needs_a_mapping() -> None:
    with pytest.raises(UserError, match="section"):
        load_config(sets=["train=3"])


def test_open_maps_accept_new_keys() -> None:
    cfg = load_config(sets=["crop.box_source.flukes=import", "crop.box_files.flukes=boxes.csv"])
    assert cfg.crop.box_source.flukes == "import"
    assert cfg.crop.box_files.flukes == "boxes.csv"


def test_open_map_override_keeps_its_other_keys() -> None:
    cfg = load_config(sets=["crop.box_source.flukes=import"])
    assert cfg.crop.box_source.fullbody == load_config().crop.box_source.fullbody


def test_missing_overlay_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(overlays=[tmp_path / "absent.yaml"])


def test_cli_unknown_key_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "00_prepare_data.py"), "--set", "nope.x=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "nope" in lines[0] and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written on a config error"
