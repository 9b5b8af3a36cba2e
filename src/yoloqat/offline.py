"""Keep Ultralytics and DVCLive offline and out of the user's global state.

Must run before the first ``import ultralytics``: Ultralytics reads these environment
variables at import time.  Settings live in ``.yoloqat/ultralytics`` inside the repo, so a
user's own ``~/.config/Ultralytics`` is neither read nor changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def project_state_dir() -> Path:
    """The project's state folder (``.yoloqat`` of this checkout, or ``$YOLOQAT_STATE_DIR``)."""
    return Path(os.environ.get("YOLOQAT_STATE_DIR") or _REPO_ROOT / ".yoloqat")


def configure_offline(state_dir: Path | None = None) -> Path:
    """Point Ultralytics at a project-owned settings folder and forbid network side effects."""
    state_dir = Path(state_dir or project_state_dir())
    cfg_dir = state_dir / "ultralytics"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg_dir))
    os.environ["YOLO_OFFLINE"] = "1"  # no hub, no GitHub asset or font downloads
    os.environ["YOLO_AUTOINSTALL"] = "false"  # never pip-install at run time
    os.environ.setdefault("YOLO_VERBOSE", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # torch warns "No CUDA runtime is found" on every CPU-only import of its extension loader
    # (Ultralytics and Brevitas import it); on a CPU machine that is expected, not news.
    import torch

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import ultralytics.utils as uu

    _drop_trainer_args_line(logging.getLogger(uu.LOGGING_NAME))
    _drop_heif_requirement_line(logging.getLogger(uu.LOGGING_NAME))

    # Ultralytics' own DVCLive callback would write ./dvclive from every stage; the project
    # logs through its own Live objects instead.  Other integrations are off for the same reason.
    wanted = {"dvc": False, "sync": False, "tensorboard": False, "wandb": False,
              "mlflow": False, "clearml": False, "comet": False, "raytune": False,
              "vscode_msg": False, "openvino_msg": False,
              "runs_dir": str(state_dir / "runs"), "weights_dir": str(state_dir / "weights"),
              "datasets_dir": str(state_dir / "datasets")}
    changes = {k: v for k, v in wanted.items() if k in uu.SETTINGS and uu.SETTINGS[k] != v}
    if changes:
        uu.SETTINGS.update(changes)
    _provide_fonts(uu.USER_CONFIG_DIR)
    return cfg_dir


def _provide_fonts(user_config_dir: Path) -> None:
    """Every dataset check calls ``check_font("Arial.ttf")``, which probes the network when the
    font is missing (even with YOLO_OFFLINE and plots off).  Matplotlib ships DejaVu Sans; a
    copy under the names Ultralytics looks for keeps that probe from ever running."""
    import shutil

    from matplotlib import font_manager

    source = Path(font_manager.findfont("DejaVu Sans", fallback_to_default=True))
    user_config_dir.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = user_config_dir / name
        if not target.exists() and source.is_file():
            shutil.copyfile(source, target)


class _TrainerArgsLine(logging.Filter):
    """Drops Ultralytics' one-line dump of every trainer argument (~1,700 characters per trainer).

    The same arguments are kept, readable, in ``results/<stage>/ultralytics/args.yaml``; the
    epoch table and progress bars still print.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("engine/trainer: " in msg and "lr0=" in msg and "epochs=" in msg)


def _drop_trainer_args_line(logger: logging.Logger) -> None:
    if not any(isinstance(f, _TrainerArgsLine) for f in logger.filters):
        logger.addFilter(_TrainerArgsLine())


class _HeifRequirementLine(logging.Filter):
    """Drops Ultralytics' "requirements: Ultralytics requirement ['pi-heif'] not found" warning.

    Ultralytics patches ``PIL.Image.open``: a file Pillow cannot identify makes it look for the
    pi-heif plugin (HEIC photos), once per such file, and it can never install it here
    (``YOLO_AUTOINSTALL=false``, offline).  The project probes every image with Pillow when it
    prepares a dataset and reports the unreadable ones itself (``<stage>: warning: ...
    unreadable images``), so the line only repeats that, once per bad file.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("pi-heif" in msg and "not found" in msg)


def _drop_heif_requirement_line(logger: logging.Logger) -> None:
    if not any(isinstance(f, _HeifRequirementLine) for f in logger.filters):
        logger.addFilter(_HeifRequirementLine())
