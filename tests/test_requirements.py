"""The install contract: requirements.txt states ranges, constraints.txt the tested set, and the
Makefile installs with both, so a fresh clone gets the versions the benchmarks were measured on."""

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
