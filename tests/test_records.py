"""The benchmark runs the README reports ran the settings the repository ships.

Each results file of record embeds the resolved config of its run; resolving the same profile
and overlays now must give the same value for every key the run had, but for the folders and the
worker counts (which the runs set for their machine and do not change a score). A default
changed in config.yaml or a profile without a new run fails here, instead of leaving the README's
figures describing settings nobody ships. Keys added since a run are not compared: a new key
whose default keeps the old behaviour needs no rerun.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from whaleid.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RECORDS = {
    "accuracy_demo_default.md": [],
    "accuracy_rightwhale_cpu.md": ["configs/cpu.yaml", "configs/rightwhale.yaml"],
    "accuracy_rightwhale_gpu_refit384lr.md": ["configs/gpu.yaml", "configs/rightwhale.yaml"],
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _machine_only(key: str) -> bool:
    return key.startswith("paths.") or key.endswith(".workers")


def ran_config(results: Path) -> dict:
    """The first resolved config embedded in a results file of bench_accuracy.py."""
    text = results.read_text()
    assert "<summary>resolved config</summary>" in text, f"{results.name} embeds no resolved config"
    block = text.split("<summary>resolved config</summary>", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_the_run_of_record_ran_the_shipped_settings(name: str) -> None:
    ran = _flat(ran_config(ROOT / "bench" / "results" / name))
    now = _flat(load_config([ROOT / p for p in RECORDS[name]]).to_dict())
    differ = {k: (ran[k], now.get(k, "<removed>")) for k in sorted(ran)
              if not _machine_only(k) and ran[k] != now.get(k, "<removed>")}
    assert not differ, f"{name} ran other settings than the repository ships (ran, now): {differ}"
