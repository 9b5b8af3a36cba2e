"""The model ladder yolo10n -> yolo10s -> yolo10m: decide on the evidence of each rung.

Runs are pooled per model and setting (:mod:`yoloqat.analysis.ladder_groups`) and shown as
tables (:mod:`yoloqat.analysis.ladder_tables`).

Rung decision, on the setting that params.yaml configures (with the rung's model):

* ``incomplete`` / ``not_started``: fewer than ``ladder.min_seeds`` seeds with an EMA curve;
* ``failed``: some EMA+QC curve is not stable: the method does not hold at this size;
* ``no_failure``: every EMA curve is stable but the control never failed in any seed: the
  rung cannot show anything (no failure was reproduced);
* ``passed``: the control failed in at least one seed and every EMA curve is stable.

The rungs are walked in order and the ladder stops at the first rung that has not passed, so
a larger model is never recommended before a smaller one has shown the method working.
``--queue-next`` queues the missing seeds of that rung (``ema=true qc=true``: one run gives
both curves and the QC delta).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from yoloqat.analysis.experiments import run_dvc
from yoloqat.analysis.ladder_groups import (
    METHOD_EMA_QC,
    RUNGS,
    Group,
    Setting,
    live_failed_beyond_fp,
    method_name,
    setting_values,
)
from yoloqat.analysis.records import flatten, resolved_params
from yoloqat.config import LadderConfig, load_config_for

PASSED, FAILED_RUNG, NO_FAILURE = "passed", "failed", "no_failure"
INCOMPLETE, NOT_STARTED = "incomplete", "not_started"


# --------------------------------------------------------------------------------------------
# the rung decision


@dataclass
class Rung:
    model: str
    state: str
    seeds: int  # seeds with an EMA curve at the configured setting
    need: int
    ema_failed: int
    live_failed: int
    p_value: float | None
    pending: int
    missing_seeds: list[int]
    other_settings: int = 0  # groups of this model at other settings (never pooled)
    blocked_by: str | None = None
    too_short: int = 0  # seeds whose EMA curve was too short to judge (never counted)
    # the curve the rung was decided on: "EMA+QC" (every seed logged it), else says what it was
    method: str = METHOD_EMA_QC
    # seeds whose live curve failed worse than their FP-continued control (same recipe, no
    # quantization); None when no seed trained that control
    live_failed_beyond_fp: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def text(self) -> str:
        if self.blocked_by:
            return f"waiting for {self.blocked_by}"
        counts = (f"{self.method} not stable in {self.ema_failed}/{self.seeds} seeds, live (control) in "
                  f"{self.live_failed}/{self.seeds}")
        if self.live_failed_beyond_fp is not None:
            counts += (f", worse than its FP-continued control in "
                       f"{self.live_failed_beyond_fp}/{self.seeds}")
        p = f", paired p = {self.p_value:.3f}" if self.p_value is not None else ""
        return {
            PASSED: f"passed ({counts}{p})",
            FAILED_RUNG: f"FAILED: {self.method} is not stable ({counts}{p})",
            NO_FAILURE: f"no failure reproduced: the rung cannot show anything ({counts})",
            INCOMPLETE: f"incomplete ({self.seeds}/{self.need} seeds, {self.pending} queued"
                        + (f", {self.too_short} too short to judge: raise qat.epochs above "
                           "stability.grace_epochs)" if self.too_short else ")"),
            NOT_STARTED: "not started",
        }[self.state]


@dataclass
class Decision:
    rungs: list[Rung]
    next_rung: str | None
    summary: str
    min_seeds: int
    seeds: list[int]

    def rung(self, model: str) -> Rung:
        return next(r for r in self.rungs if r.model == model)

    def lines(self) -> list[str]:
        out = [(f"Ladder {' -> '.join(RUNGS)} at the configured setting: a rung passes when "
                f"the live curve (control) fails in >= 1 seed (worse than its FP-continued control "
                f"where one was trained) and every EMA+QC curve (EMA where "
                f"no per-epoch QC curve was logged) is "
                f"stable, over >= {self.min_seeds} seeds.")]
        out += [f"  {r.model}: {r.text()}" + (f"; {r.other_settings} other setting(s) not pooled"
                                              if r.other_settings and not r.blocked_by else "")
                for r in self.rungs]
        out.append(f"Next rung: {self.next_rung or 'none'}. {self.summary}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"next_rung": self.next_rung, "summary": self.summary,
                "min_seeds": self.min_seeds, "seeds": self.seeds,
                "rungs": [r.as_dict() for r in self.rungs]}


def configured_setting(model: str, params: dict[str, Any]) -> Setting:
    return Setting(model, setting_values(resolved_params(params)))


def _rung(model: str, groups: Sequence[Group], cfg: LadderConfig, params: dict[str, Any]) -> Rung:
    want = configured_setting(model, params)
    group = next((g for g in groups if g.setting == want), None)
    others = sum(1 for g in groups if g.model == model and g.setting != want)
    runs = group.ema_runs() if group else []
    short = group.too_short() if group else []
    pending = len(group.pending) if group else 0
    # a too_short seed is not missing: queuing it again at this setting gives the same curve
    have = ({r.seed for r in runs} | {r.seed for r in short}
            | ({seed for _, seed in group.pending} if group else set()))
    missing = [s for s in cfg.seeds if s not in have]
    ema_failed = sum(r.ema.failed for r in runs if r.ema)
    live_failed = sum(r.live.failed for r in runs if r.live)
    with_fp = any(r.fp_control is not None for r in runs)
    # with the FP-continued control trained, a failure counts as quantization's only where it
    # is worse than the control's under the same recipe (a dip both show is the recipe's)
    failures = sum(live_failed_beyond_fp(r) for r in runs) if with_fp else live_failed
    p = group.paired() if group else None
    if ema_failed:
        # a rung passes only if *every* EMA(+QC) curve is stable: one failure decides it, so
        # the missing seeds would be compute spent on a known answer
        state = FAILED_RUNG
    elif len(runs) < cfg.min_seeds:
        state = INCOMPLETE if runs or pending or short else NOT_STARTED
    elif not failures:
        state = NO_FAILURE
    else:
        state = PASSED
    return Rung(model, state, len(runs), cfg.min_seeds, ema_failed, live_failed,
                p.p_value if p and p.pairs else None, pending, missing, others,
                too_short=len(short), method=method_name(runs),
                live_failed_beyond_fp=failures if with_fp else None)


def decide(groups: Sequence[Group], cfg: LadderConfig, params: dict[str, Any]) -> Decision:
    rungs = [_rung(m, groups, cfg, params) for m in RUNGS]
    next_rung, blocker = None, None
    summary = "EMA+QC held on every rung where the control failed: the ladder is complete."
    for r in rungs:
        if blocker:
            r.blocked_by = blocker
            continue
        if r.state == PASSED:
            continue
        blocker = r.model
        if r.state == FAILED_RUNG:
            summary = (f"{r.method} is not stable on {r.model}: the ladder stops here; do not "
                       "climb to a larger model.")
        elif r.state == NO_FAILURE:
            summary = (f"On {r.model} the control never failed, so stability of {r.method} shows "
                       "nothing; reproduce the failure first (a setting where the live curve "
                       "collapses) before climbing.")
        else:
            next_rung = r.model
            summary = f"{r.model} needs {r.need - r.seeds} more seed(s) at this setting."
    return Decision(rungs, next_rung, summary, cfg.min_seeds, list(cfg.seeds))


# --------------------------------------------------------------------------------------------
# queueing the next rung


def queue_command(model: str, seeds: Sequence[int]) -> list[str]:
    """One ``ema=true qc=true`` run per seed gives the live and EMA curves and the QC delta."""
    return ["dvc", "exp", "run", "--queue", "-S", f"model={model}", "-S", "ema=true",
            "-S", "qc=true", "-S", "seed=" + ",".join(str(s) for s in seeds)]


QUEUE_START = ["dvc", "queue", "start"]


def queue_next(
    decision: Decision, repo: str | Path = ".", dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[str] | None:
    """Queue the next rung's missing seeds (one ``dvc exp run --queue``); the command or None."""
    if decision.next_rung is None:
        echo(f"nothing to queue: {decision.summary}")
        return None
    rung = decision.rung(decision.next_rung)
    if not rung.missing_seeds:
        echo(f"nothing to queue: every ladder seed of {rung.model} is judged or queued")
        return None
    cmd = queue_command(rung.model, rung.missing_seeds)
    if dry_run:
        echo(f"would run: {shlex.join(cmd)}")
    else:
        echo(f"$ {shlex.join(cmd)}")
        for line in run_dvc(cmd[1:], repo).splitlines():
            if line.strip():
                echo(line.rstrip())
    echo(f"then start the queue: {shlex.join(QUEUE_START)}")
    return cmd


# --------------------------------------------------------------------------------------------
# params


def ladder_settings(params: str | Path) -> tuple[LadderConfig, dict[str, Any]]:
    """(ladder config, flattened params) of a params file; defaults when it does not exist.
    When something unrelated is invalid (a dataset path missing here) only the ladder block is
    validated."""
    cfg = load_config_for(params, "ladder")
    path = Path(params)
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    return cfg.ladder, flatten(raw if isinstance(raw, dict) else cfg.as_dict())
