"""The documentation cannot drift from the code: docs/parameters.md names exactly the config
dataclasses' fields with their defaults, every preset has its entry, and every relative link of
README.md, docs/ and reports/ points at a file (and heading) that exists."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import REPO
from yoloqat.config import Config
from yoloqat.presets import PRESETS

PARAMETERS_DOC = REPO / "docs" / "parameters.md"
# a table row that documents one key: | `dotted.key` | `default` | allowed | meaning |
PARAM_ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|\s*`([^`]*)`\s*\|")


def config_defaults(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every params.yaml key as a dotted name, with its dataclass default (sections walked)."""
    out: dict[str, Any] = {}
    instance = cls()
    for f in dataclasses.fields(cls):
        if f.name == "root":  # where params.yaml lives, not a param
            continue
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            out.update(config_defaults(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def documented_params(text: str) -> list[tuple[str, Any]]:
    rows = []
    for line in text.splitlines():
        m = PARAM_ROW.match(line)
        if m:
            rows.append((m.group(1), yaml.safe_load(m.group(2))))
    return rows


def _plain(value: Any) -> Any:
    """A YAML list equals the tuple a frozen dataclass keeps."""
    return list(value) if isinstance(value, tuple) else value


def params_doc_problems(text: str, defaults: dict[str, Any]) -> list[str]:
    rows = documented_params(text)
    keys = [k for k, _ in rows]
    problems = []
    missing = sorted(set(defaults) - set(keys))
    if missing:
        problems.append("not documented: " + ", ".join(missing))
    unknown = sorted(set(keys) - set(defaults))
    if unknown:
        problems.append("documented but not a param: " + ", ".join(unknown))
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        problems.append("documented twice: " + ", ".join(repeated))
    for key, doc_default in rows:
        if key in defaults and _plain(doc_default) != _plain(defaults[key]):
            problems.append(
                f"{key}: documented default {doc_default!r}, dataclass default {defaults[key]!r}"
            )
    return problems


def test_parameters_doc_names_every_param_with_its_default():
    problems = params_doc_problems(PARAMETERS_DOC.read_text(), config_defaults())
    assert not problems, (
        "docs/parameters.md is out of date with src/yoloqat/config.py: " + "; ".join(problems)
    )


def test_the_params_doc_check_catches_a_missing_key_an_unknown_one_and_a_wrong_default():
    defaults = {"qat.bits": 4, "qat.repair_curves": (), "ladder.seeds": (0, 1)}
    doc = """\
| key | default | allowed | meaning |
|---|---|---|---|
| `qat.bits` | `8` | ... | ... |
| `qat.repair_curves` | `[]` | ... | ... |
| `qat.gone` | `0` | ... | ... |
"""
    assert params_doc_problems(doc, defaults) == [
        "not documented: ladder.seeds",
        "documented but not a param: qat.gone",
        "qat.bits: documented default 8, dataclass default 4",
    ]


def test_config_defaults_walk_every_section():
    defaults = config_defaults()
    assert defaults["qat.bits"] == 4 and defaults["ladder.seeds"] == (0, 1, 2, 3, 4)
    assert defaults["preset"] == "none" and "root" not in defaults and "qat" not in defaults
    sections = {k.split(".")[0] for k in defaults if "." in k}
    assert sections == {
        "data",
        "fp",
        "qat",
        "correction",
        "export",
        "evaluate",
        "stability",
        "ladder",
    }


def test_presets_doc_has_an_entry_per_preset():
    text = (REPO / "docs" / "presets.md").read_text()
    missing = [name for name in PRESETS if name != "none" and f"\n- `{name}`:" not in text]
    assert not missing, f"docs/presets.md has no entry for preset(s) {missing}"


# --------------------------------------------------------------------------------------------
# links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)


def documentation_files() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "reports").rglob("README.md")),
    ]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    anchors: set[str] = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def broken_links(doc: Path) -> list[str]:
    text = doc.read_text()
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            bad.append(f"{target} (no such heading in {os.path.relpath(dest, doc.parent)})")
    return bad


def test_every_relative_link_of_the_documentation_resolves():
    files = documentation_files()
    assert {"README.md", "docs/parameters.md", "reports/README.md"} <= {
        f.relative_to(REPO).as_posix() for f in files
    }
    bad = {f.relative_to(REPO).as_posix(): broken_links(f) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"broken links: {bad}"


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Some Title: `code`, 3 seeds (2026-11-30)\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](other.md#some-title-code-3-seeds-2026-11-30) [web](https://x.org/a) [self](#here)\n"
        "## Here\n[gone](nope.md) [bad anchor](other.md#nope) ![img](pic.png)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(doc) == [
        "nope.md (no such file)",
        "other.md#nope (no such heading in other.md)",
        "pic.png (no such file)",
    ]
