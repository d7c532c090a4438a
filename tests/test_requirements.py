"""The install contract: requirements.txt states ranges, constraints.txt the tested set, and the
Makefile installs with both, so a fresh clone gets the versions the benchmarks were measured on."""

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in _lines("constraints.txt"):
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt: {line!r} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt pins {req.name} twice"
        pins[name] = Version(specs[0].version)
    return pins


def test_every_requirement_is_pinned_within_its_range():
    pins = _pins()
    for line in _lines("requirements.txt"):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in requirements.txt but has no tested version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside requirements.txt's {req.specifier}")


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "-r requirements.txt" in line]
    assert installs, "the Makefile no longer installs requirements.txt"
    assert all("-c constraints.txt" in line for line in installs), installs
    assert all("--no-cache-dir" in line for line in installs), (
        "pip's cache would hold a second copy of torch's CUDA wheels (a CI run ran out of disk)")
    assert "$(VENV)/.installed: requirements.txt constraints.txt" in makefile, (
        "a change of constraints.txt must reinstall the venv")


def _defined_options(script: Path) -> set[str]:
    """The --options a bench script's parser defines (its own, and whaleid.cli's for --config/--set)."""
    source = script.read_text()
    if "build_parser" in source:
        source += (ROOT / "whaleid" / "cli.py").read_text()
    return set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", source))


def test_every_bench_call_in_the_makefile_uses_options_its_script_defines():
    calls = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()
             if re.search(r"\$\(PY\) bench/\w+\.py", line)]
    assert len(calls) >= 7, calls                      # bench (4), bench-accuracy (1), bench-gpu (3)
    for call in calls:
        script = ROOT / re.search(r"bench/\w+\.py", call).group(0)
        assert script.is_file(), call
        used = {opt.split("=")[0] for opt in re.findall(r"(?<!\S)--[a-z0-9-]+", call)}
        unknown = used - _defined_options(script)
        assert not unknown, f"Makefile calls {script.name} with {sorted(unknown)}, which it does not define"


def test_every_cuda_only_test_is_selected_by_make_bench_gpu():
    """`make bench-gpu` runs `pytest -k cuda`: a CUDA-only test without 'cuda' in its name would never run."""
    assert "pytest -q -rs -k cuda" in (ROOT / "Makefile").read_text()
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        for m in re.finditer(r"skipif\(not torch\.cuda\.is_available\(\)[^\n]*\n(?:@[^\n]*\n)*def (\w+)", source):
            found.append(m.group(1))
    assert len(found) >= 2, found
    assert all("cuda" in name for name in found), found
