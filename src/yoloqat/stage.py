"""What every DVC stage entry does around its one job: config, offline setup, clean errors.

A stage that fails prints one line ``<stage>: error: <message>`` to stderr, removes the
outputs it owns (so DVC never caches a half-written result) and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from yoloqat.config import Config, ConfigError, load_config
from yoloqat.provenance import clean_on_failure


def expected_errors() -> tuple[type[BaseException], ...]:
    """The error types a stage reports as one line (bad input), not as a traceback."""
    # imported here, not at module level: a stage pays only for the modules its job imports
    from yoloqat.data.errors import DataError
    from yoloqat.evaluate import EvaluateError
    from yoloqat.export import ExportError
    from yoloqat.qc import CorrectionError
    from yoloqat.quant.checkpoint import CheckpointError
    from yoloqat.verdict import VerdictError

    return (ConfigError, DataError, CheckpointError, CorrectionError, ExportError, EvaluateError,
            VerdictError)


def run_stage(
    name: str, job: Callable[[Config], None], outputs: Callable[[Config], list[Path]]
) -> int:
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"DVC stage {name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    args = parser.parse_args()
    try:
        cfg = load_config(args.params)
    except ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    os.chdir(cfg.root)
    from yoloqat.offline import configure_offline

    configure_offline()
    try:
        with clean_on_failure(*outputs(cfg)):
            job(cfg)
    except expected_errors() as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{name}: error: {msg}", file=sys.stderr)
        return 2
    return 0
