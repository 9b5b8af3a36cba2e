"""A run's curve judged by today's stability rules, for runs whose stored verdict has no label
for it (runs made before the verdict stored a label per repair curve).

The rules are the run's own ``stability`` params (checked like params.yaml's section; a key the
run lacks takes today's default), applied from the end of its warm-up, as the verdict stage
applies them.  The repair table, the ladder's endpoint rows and the ladder's decision all judge an
unlabelled curve through here, so one run's curve gets one label everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from yoloqat.analysis.records import ExpRecord
from yoloqat.config import StabilityConfig
from yoloqat.config_checks import build
from yoloqat.curves.stability import Verdict, after_warmup, classify_run


def run_stability(rec: ExpRecord) -> StabilityConfig:
    """The run's stability rules; a bad stored value is a one-line ConfigError naming its key."""
    fields = {k.split(".", 1)[1]: v for k, v in rec.params.items() if k.startswith("stability.")}
    return build(StabilityConfig, fields, prefix="stability.")


def verdict_now(rec: ExpRecord, values: Sequence[float]) -> Verdict:
    """The verdict of one of the run's curves under today's rules, from the end of its warm-up."""
    warmup = float(rec.params.get("qat.warmup_epochs") or 0.0)
    rules = after_warmup(run_stability(rec), warmup)
    return classify_run(list(values), None, rules, (rec.metrics.get("qat") or {}).get("status"))


def current_label(rec: ExpRecord, values: Sequence[float]) -> str:
    return verdict_now(rec, values).label
