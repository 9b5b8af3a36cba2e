"""params.yaml as ``dvc exp run -S`` leaves it in the workspace.

DVC rewrites the whole file with its own YAML dumper (ruamel round trip, through
``dvc.utils.hydra.apply_overrides``, which ``dvc exp run -S key=value`` calls): a ``null``
becomes an empty value, a flow list ``[0, 1]`` a block list, ``1e-5`` becomes ``1e-05``.
``dvc exp run`` and ``dvc exp apply`` leave that file in the workspace, so every reader of
params.yaml must read it as it read the original, in a repo copy as CI has one.
"""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.helpers import REPO, copy_repo, run, tiny_params, use_env_with_venv
from yoloqat.analysis.experiments import read_experiments
from yoloqat.analysis.judge import stability_config
from yoloqat.analysis.ladder import ladder_settings
from yoloqat.cli import main
from yoloqat.config import load_config

# overrides that make DVC rewrite a null, a flow list, a float and a plain value
OVERRIDES = {"seed": 1, "ladder.seeds": [1, 2], "qat.dampening": 1e-05, "fp.seed": None}


def dvc_rewrite(path, overrides: dict) -> None:
    """What ``dvc exp run -S key=value ...`` does to params.yaml before it runs the pipeline."""
    from dvc.utils.hydra import apply_overrides

    def hydra(value):
        return "null" if value is None else str(value).replace(" ", "")

    apply_overrides(path, [f"{k}={hydra(v)}" for k, v in overrides.items()])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    """A tiny repo copy whose params.yaml DVC rewrote (committed params kept as ``before``)."""
    params = tiny_params({"fp": {"seed": 0}, "evaluate": {"runtimes": ["onnxruntime"]}})
    repo = copy_repo(tmp_path_factory.mktemp("rewritten") / "repo", params)
    before = repo.parent / "before.yaml"
    before.write_text((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(
        (repo / "params.yaml")
        .read_text()
        .replace("runtimes:\n  - onnxruntime", "runtimes: [onnxruntime]")
    )
    dvc_rewrite(repo / "params.yaml", OVERRIDES)
    return repo, before


def test_the_rewrite_is_dvcs_style(rewritten):
    """The fixture really has the forms that tripped readers: empty values and block lists."""
    repo, _ = rewritten
    text = (repo / "params.yaml").read_text()
    assert "  seed:\n" in text and "null" not in text  # fp.seed=null written as an empty value
    assert "runtimes:\n  - onnxruntime" in text and "seeds:\n  - 1\n  - 2" in text
    assert "dampening: 1e-05" in text


def test_config_reads_the_rewritten_file_as_the_original_plus_the_overrides(rewritten):
    repo, before = rewritten
    old, new = load_config(before).as_dict(), load_config(repo / "params.yaml").as_dict()
    changed = {k: v for k, v in _flat(new).items() if _flat(old).get(k) != v}
    assert changed == {"seed": 1, "ladder.seeds": [1, 2], "qat.dampening": 1e-05, "fp.seed": None}


def test_judge_and_ladder_read_their_blocks_from_the_rewritten_file(rewritten):
    repo, before = rewritten
    assert stability_config(repo / "params.yaml") == stability_config(before)
    ladder, flat = ladder_settings(repo / "params.yaml")
    assert list(ladder.seeds) == [1, 2] and flat["seed"] == 1 and flat["fp.seed"] is None


def test_source_stage_and_dvc_readers_accept_the_rewritten_workspace(
    rewritten, monkeypatch, capsys
):
    """The first stage of every run validates the file and writes the resolved params; DVC's own
    params reader (``dvc exp show``, behind ``yoloqat exps``) sees the overridden values."""
    repo, _ = rewritten
    script = REPO / "stages" / "source.py"
    res = run(
        [sys.executable, str(script), "--params", str(repo / "params.yaml")], repo, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    resolved = yaml.safe_load((repo / "results/resolved_params.yaml").read_text())["resolved"]
    assert (resolved["seed"], resolved["fp"]["seed"]) == (1, 1)  # fp.seed null -> seed

    use_env_with_venv(monkeypatch)
    (workspace,) = [r for r in read_experiments(repo) if r.kind == "workspace"]
    assert workspace.params["seed"] == 1 and workspace.params["ladder.seeds"] == [1, 2]
    assert workspace.params["fp.seed"] is None
    monkeypatch.chdir(repo)
    assert main(["exps"]) == 0, capsys.readouterr().err
