"""Small builders shared by the slower tests: a tiny params file and a repo copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"train_images": 24, "val_images": 8, "calib_images": 8, "imgsz": 64},
    "fp": {"epochs": 1, "batch": 8},
    "qat": {"epochs": 2, "batch": 8},
    "correction": {"batch": 4, "min_steps": 2},
    "export": {"parity_images": 2},
    "evaluate": {"latency_warmup": 1, "latency_runs": 2, "batch": 4},
}


def default_params() -> dict[str, Any]:
    """A params.yaml's contents built from the config's defaults, not read from the checkout's
    params.yaml (which ``dvc exp run`` rewrites); tests/test_layout.py checks the two agree."""
    from yoloqat.config import Config

    return Config().as_dict()


def tiny_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = default_params()
    for block, values in {**TINY, **(overrides or {})}.items():
        if isinstance(values, dict):
            raw.setdefault(block, {}).update(values)
        else:
            raw[block] = values
    return raw


def env_with_venv() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GIT_AUTHOR_NAME", "yoloqat-test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@yoloqat.local")
    env.setdefault("GIT_COMMITTER_NAME", "yoloqat-test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@yoloqat.local")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def use_env_with_venv(monkeypatch: Any) -> None:
    """:func:`env_with_venv`'s PATH, git identity and DVC settings for this process too (for
    code that runs dvc or git in-process, e.g. through the CLI)."""
    env = env_with_venv()
    for key in ("PATH", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL", "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(key, env[key])


def copy_repo(dst: Path, params: dict[str, Any]) -> Path:
    """A fresh git + DVC repo holding this project's pipeline with ``params``."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in ("dvc.yaml", "stages", "src", "pyproject.toml", ".dvcignore"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / item)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = env_with_venv()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q", "--force"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True, timeout=120)
    # the project's plot templates (dvc.yaml names them), into the fresh .dvc
    shutil.copytree(REPO / ".dvc/plots", dst / ".dvc/plots", dirs_exist_ok=True)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "test repo"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True, timeout=120)
    return dst


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=cwd, env=env_with_venv(), capture_output=True, text=True,
                          timeout=timeout)


def write_ladder_params(folder: Path) -> Path:
    """A params.yaml with the settings the recorded ladder fixtures' experiments were run with."""
    import yaml

    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"qat": {"bits": 4, "init": "fp"},
                                    "ladder": {"min_seeds": 3, "seeds": [0, 1, 2]}}))
    return path


def committed_params_text() -> str:
    """params.yaml as committed at HEAD (the file itself outside a git checkout).

    ``dvc exp run`` and ``dvc exp apply`` leave an experiment's values in the workspace's
    params.yaml (rewritten in DVC's YAML style); the tests about the project's defaults read
    this instead, so ``make test`` passes right after an experiment."""
    res = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return res.stdout if res.returncode == 0 else (REPO / "params.yaml").read_text()


def committed_params() -> dict[str, Any]:
    return yaml.safe_load(committed_params_text())


def committed_params_file(folder: Path) -> Path:
    """:func:`committed_params_text` written to ``folder/params.yaml`` (comments and layout kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(committed_params_text())
    return path
