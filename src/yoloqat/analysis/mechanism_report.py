"""Per-epoch mechanism tables of archived runs (``qat.mechanism_batches``): the curves beside
the BN running-statistics mismatch, the clipped fraction, the learned-scale shrink and the
deployed model's output (its top score, how many predictions the validator keeps) of the same
epoch, so "does the collapse coincide with the mismatch, the clipping, or neither" is read off
committed data (``yoloqat repairs --from DIR`` appends one table per run that logged them).
"""

from __future__ import annotations

from collections.abc import Sequence

from yoloqat.analysis.exp_curves import run_curves
from yoloqat.analysis.records import ExpRecord, resolved_params
from yoloqat.config import LEARNED_SCALINGS
from yoloqat.curves.keys import AUGMENTED, curve_key, mechanism_group, repair_prefix, series
from yoloqat.numbers import fixed


# (column title, series); an empty title joins the column before it as "a / b"
def _columns(deployed: str) -> list[tuple[str, str]]:
    plain, aug = mechanism_group(deployed), mechanism_group(deployed, AUGMENTED)
    bnre = mechanism_group(deployed, bnre=True)
    return [
        ("live", curve_key("live")),
        (deployed.upper() if deployed == "ema" else deployed, curve_key(deployed)),
        (f"{deployed.upper()}+BNre", curve_key(repair_prefix(deployed, "bnre"))),
        ("BN log-var mismatch, plain (mean / worst)", series(plain, "bn_logvar_mean")),
        ("", series(plain, "bn_logvar_worst")),
        ("... augmented (mean)", series(aug, "bn_logvar_mean")),
        ("... after BNre, plain (mean)", series(bnre, "bn_logvar_mean")),
        ("mean shift, plain (mean)", series(plain, "bn_mean_shift_mean")),
        ("clipped (mean / max)", series(plain, "clipped_mean")),
        ("", series(plain, "clipped_max")),
        ("scale / start (median)", series(plain, "scale_ratio_median")),
        ("BN var < fp16 tiny", series(plain, "bn_var_below_fp16")),
        # what the deployed model outputs there: no confident box at all, or confident ones
        ("top score, plain (mean)", series(plain, "out_score_max_mean")),
        ("predictions > 0.001 per image", series(plain, "out_above_001")),
    ]


def _digits(name: str) -> int:
    if name.endswith("mAP50-95"):
        return 3
    if name.endswith("_below_fp16"):
        return 0  # a channel count
    if name.endswith("out_above_001"):
        return 1  # a mean count per image
    return 4


def has_mechanism(rec: ExpRecord) -> bool:
    qat = run_curves(rec).get("qat", {})
    return any(name.startswith("mech_") for name in qat)


def cumulative_decay(rec: ExpRecord) -> list[float] | None:
    """Per epoch, the learned scales' cumulative decay lr x weight decay x optimizer steps: the
    quantity the 100x analog holds equal.  From the logged per-epoch lr of the scale group and
    steps / epochs; an approximation within an epoch (lr is logged once per epoch).  None when
    the run has no learned scales (qat.scaling maxabs) or did not log what the sum needs.

    The scale group is the last ``lr/pgN``: QATTrainer.build_optimizer appends it with
    ``add_param_group`` (qat_setup.move_to_group) after Ultralytics has built all of its own
    groups, Ultralytics builds the optimizer once (a resume loads state into the same groups) and
    logs ``lr/pg<i>`` in ``param_groups`` order.  It exists only when the model has learned
    scales; without them the last group is one of Ultralytics' own, hence the scaling check."""
    qat = run_curves(rec).get("qat", {})
    groups = sorted((k for k in qat if k.startswith("lr/pg")), key=lambda k: int(k[5:]))
    params = resolved_params(rec.params)
    wd, summary = params.get("qat.scale_weight_decay"), rec.metrics.get("qat") or {}
    steps, epochs = summary.get("steps"), summary.get("epochs")
    learned = params.get("qat.scaling") in LEARNED_SCALINGS
    if not learned or not groups or not isinstance(wd, (int, float)) or not steps or not epochs:
        return None
    per_epoch, total, out = steps / epochs, 0.0, []
    for lr in qat[groups[-1]]:
        total += lr * wd * per_epoch
        out.append(total)
    return out


def mechanism_table(rec: ExpRecord) -> str:
    """One row per epoch; a cell pair "a / b" where the title says so; ``-``: not logged."""
    qat = run_curves(rec).get("qat", {})
    deployed = "ema" if rec.params.get("ema", True) else "live"
    cols = _columns(deployed)
    titles: list[str] = []
    for title, _ in cols:
        if title:
            titles.append(title)
    n = max((len(v) for k, v in qat.items() if k in {c for _, c in cols}), default=0)

    def cell(name: str, i: int, digits: int) -> str:
        values = qat.get(name) or []
        return fixed(values[i], digits) if i < len(values) else "-"

    decay = cumulative_decay(rec) or []
    lines = ["| epoch | cum. lr x wd x steps | " + " | ".join(titles) + " |",
             "|" + "---|" * (len(titles) + 2)]
    for i in range(n):
        cells: list[str] = [fixed(decay[i], 3) if i < len(decay) else "-"]
        for title, name in cols:
            text = cell(name, i, _digits(name))
            if title:
                cells.append(text)
            else:  # the second half of the column before
                cells[-1] += " / " + text
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mechanism_sections(records: Sequence[ExpRecord]) -> str:
    out = []
    for rec in sorted(records, key=lambda r: r.name):
        if has_mechanism(rec):
            out.append(f"\n## Mechanism per epoch: {rec.name}\n\n" + mechanism_table(rec))
    return "".join(out)
