"""pixi.toml (not runnable on these machines) must name the same dependencies as pyproject.toml;
the pip locks must pin them within its ranges."""

from __future__ import annotations

import re
import tomllib

import pytest

from tests.helpers import REPO


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pixi():
    return tomllib.loads((REPO / "pixi.toml").read_text())


def test_pixi_parses_and_has_cpu_and_cu128_environments():
    pixi = _pixi()
    assert set(pixi["environments"]) >= {"cpu", "cu128"}
    assert {"run", "test"} <= set(pixi["tasks"])
    assert "12.8" in pixi["feature"]["cu128"]["system-requirements"]["cuda"]


def test_pixi_names_the_same_dependencies_as_pyproject():
    py, pixi = _pyproject(), _pixi()
    runtime = {_name(r) for r in py["project"]["dependencies"]}
    runtime |= {_name(r) for r in py["project"]["optional-dependencies"]["cpu"]}
    common = set(pixi["pypi-dependencies"]) - {"yoloqat"}
    for env in ("cpu", "cu128"):
        feature = set(pixi["feature"][env]["pypi-dependencies"])
        names = {n.lower() for n in common | feature}
        expected = set(runtime)
        if env == "cu128":  # the GPU build of onnxruntime replaces the CPU one
            expected = (expected - {"onnxruntime"}) | {
                _name(r) for r in py["project"]["optional-dependencies"]["gpu"]
            }
        assert names == expected, (env, names ^ expected)
    for extra in ("dev", "openvino"):
        names = {_name(r) for r in py["project"]["optional-dependencies"][extra]}
        assert {n.lower() for n in pixi["feature"][extra]["pypi-dependencies"]} == names, extra


def test_console_script_and_python_range_equal_in_pyproject_and_pixi():
    py = _pyproject()
    assert py["project"]["scripts"]["yoloqat"] == "yoloqat.cli:main"
    assert py["project"]["requires-python"] == ">=3.11,<3.13" == _pixi()["dependencies"]["python"]


def test_no_environment_installs_both_onnxruntime_builds():
    """Both wheels install the `onnxruntime` module; whichever lands last silently wins."""
    py, pixi = _pyproject(), _pixi()
    base = {_name(r) for r in py["project"]["dependencies"]}  # the editable install pulls these
    assert not base & {"onnxruntime", "onnxruntime-gpu"}
    common = {n.lower() for n in pixi["pypi-dependencies"]}
    assert not common & {"onnxruntime", "onnxruntime-gpu"}
    assert "default" in pixi["environments"]
    for env, features in pixi["environments"].items():
        names = set()
        for f in features:
            names |= {n.lower() for n in pixi["feature"][f].get("pypi-dependencies", {})}
        assert len(names & {"onnxruntime", "onnxruntime-gpu"}) == 1, env


def test_version_ranges_have_upper_bounds_that_are_not_patch_pins():
    py = _pyproject()
    reqs = [
        *py["project"]["dependencies"],
        *py["project"]["optional-dependencies"]["cpu"],
        *py["project"]["optional-dependencies"]["gpu"],
    ]
    for r in reqs:
        assert "<" in r, f"{r}: no upper bound"
        assert "<=" not in r, f"{r}: pins a patch release as the upper bound"


# --------------------------------------------------------------------------------------------
# the locks `make setup` installs from (written by `make lock`)

LOCKS = {"cpu-dev": ("cpu", "dev"), "cpu-dev-openvino": ("cpu", "dev", "openvino")}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _lock(name: str) -> dict[str, tuple[str, str | None, int]]:
    """``{package: (version, marker, number of hashes)}`` of ``locks/<name>.txt``."""
    pins: dict[str, tuple[str, str | None, int]] = {}
    current = None
    for line in (REPO / "locks" / f"{name}.txt").read_text().splitlines():
        match = _PIN.match(line)
        if match:
            current = _name(match.group(1))
            pins[current] = (match.group(2), match.group(3), 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, marker, hashes = pins[current]
            pins[current] = (version, marker, hashes + 1)
        elif line and not line.startswith((" ", "#")):
            raise AssertionError(f"locks/{name}.txt: unexpected line {line!r}")
    return pins


@pytest.mark.parametrize("lock", list(LOCKS))
def test_lock_pins_every_requirement_within_pyproject_ranges(lock):
    """Each requirement of the extras the lock is for is pinned, with hashes, inside the range
    pyproject.toml gives it (a range edited without `make lock` fails here)."""
    from packaging.requirements import Requirement

    py = _pyproject()["project"]
    reqs = [
        *py["dependencies"],
        *(r for extra in LOCKS[lock] for r in py["optional-dependencies"][extra]),
    ]
    pins = _lock(lock)
    for raw in reqs:
        req = Requirement(raw)
        name = _name(req.name)
        assert name in pins, f"locks/{lock}.txt lacks {name}; run `make lock`"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"locks/{lock}.txt pins {name}=={version}, outside pyproject's {req.specifier}; run `make lock`"
        )
    unhashed = [n for n, (_, _, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"locks/{lock}.txt pins without hashes: {unhashed}"
    assert (
        pins["ultralytics"][0] == "8.4.190"
    )  # the release tests/test_ultralytics_api.py was written on


def test_openvino_lock_is_the_cpu_lock_plus_openvino():
    """`make test` installs the OpenVINO lock over the cpu-dev one: it must not move any pin."""
    base, with_openvino = _lock("cpu-dev"), _lock("cpu-dev-openvino")
    assert {n: v for n, v in with_openvino.items() if n in base} == base
    assert {n for n in with_openvino if n not in base} >= {"openvino"}
