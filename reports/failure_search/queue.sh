#!/usr/bin/env bash
# The failure search on the embedded data (yolo10n, 96 px, 480 train images, CPU), then the
# remedies grid on the failure it found.  Queue everything, `dvc queue start`, and when done:
#   yoloqat search fs-ref-cpu fs-ref-fp fs-ref-fp-maxabs fs-ref-fp-w3 fs-ref-fp-pc-swd05 \
#       fs-collapse-s0 fs-collapse-s1 fs-collapse-s2 fs-collapse-bnm01-s0 fs-collapse-bnm01-s1 \
#       fs-collapse-bnm01-s2 fs-collapse-10s-s0 fs-collapse-10s-s1
#   bash reports/remedies/report.sh                                 (the remedies grid)
#   yoloqat ladder --params <params of the collapse_cpu runs>     (the seeds grid)
# Rows run in this order; later rows are worth less if the session runs out of time.
set -euo pipefail

# The reference recipe (yoloqat/presets.py) from the trained FP model for 15 epochs, spelled out
# with preset=none: a preset only fills keys left at their default, and qat.init=fp is the default.
# SGD 0.01 / lrf 0.9 (the reference's first 10 % of schedule), momentum 0.937, wd 5e-4, warm-up 3,
# mosaic 1.0, Brevitas decoupled per-tensor int4 on every conv, scales decayed like weights.
FROM_FP=(-S qat.epochs=15 -S qat.optimizer=SGD -S qat.lr0=0.01 -S qat.lrf=0.9 -S qat.momentum=0.937
         -S qat.weight_decay=0.0005 -S qat.warmup_epochs=3.0 -S qat.mosaic=1.0 -S qat.close_mosaic=0
         -S qat.amp=true -S qat.bits=4 -S fp.control=false)
DECOUPLED=(-S qat.granularity=per_tensor -S qat.scaling=decoupled)

dvc exp run --queue -n fs-ref-fp "${FROM_FP[@]}" "${DECOUPLED[@]}" -S qat.scale_weight_decay=0.0005
# The same with the scales' decay 100x (preset collapse_cpu): ~900 steps at 0.05 shrink an
# undefended scale as far as ~90,000 steps at the reference's 0.0005.
dvc exp run --queue -n fs-collapse-s0 -S preset=collapse_cpu -S seed=0
# One factor: the project's max-abs quantizer (no learned scale to decay).
dvc exp run --queue -n fs-ref-fp-maxabs "${FROM_FP[@]}" -S qat.granularity=per_tensor -S qat.scaling=maxabs
# The failure over seeds (paired live / EMA curves and QC's delta in every run).
dvc exp run --queue -n fs-collapse-s1 -S preset=collapse_cpu -S seed=1
dvc exp run --queue -n fs-collapse-s2 -S preset=collapse_cpu -S seed=2
# The reference recipe from scratch, 30 epochs (preset reference_cpu).
dvc exp run --queue -n fs-ref-cpu -S preset=reference_cpu
# Nagel's remedies on the failure, 3 seeds each.
for s in 0 1 2; do dvc exp run --queue -n rem-bnre-s$s -S preset=collapse_cpu -S seed=$s -S qat.bn_reestimate=16; done
for s in 0 1 2; do dvc exp run --queue -n rem-freeze-s$s -S preset=collapse_cpu -S seed=$s -S qat.freeze_threshold=0.01; done
for s in 0 1 2; do dvc exp run --queue -n rem-damp-s$s -S preset=collapse_cpu -S seed=$s -S qat.dampening=0.0001 -S qat.dampening_ramp=true; done
# More single factors.
dvc exp run --queue -n fs-ref-fp-pc-swd05 "${FROM_FP[@]}" -S qat.granularity=per_channel -S qat.scaling=decoupled -S qat.scale_weight_decay=0.05
dvc exp run --queue -n fs-ref-fp-w3 "${FROM_FP[@]}" "${DECOUPLED[@]}" -S qat.scale_weight_decay=0.0005 -S qat.bits=3
# Session 4 (2026-11-30): more single factors on the failure, and QC without its head part.
# BN momentum 0.1 (Ultralytics: 0.03) on the failure; the failure on yolo10s.
dvc exp run --queue -n fs-collapse-bnm01-s0 -S preset=collapse_cpu -S seed=0 -S qat.bn_momentum=0.1
dvc exp run --queue -n fs-collapse-10s-s0 -S preset=collapse_cpu -S seed=0 -S model=yolo10s
# QC without the head's output convs on the failure (QAT is the same as fs-collapse-s0/s2).
for s in 0 2; do dvc exp run --queue -n qc-nohead-s$s -S preset=collapse_cpu -S seed=$s -S correction.head=false; done
# Session 5 (2026-11-30): BN momentum 0.1 over the other two seeds.
for s in 1 2; do dvc exp run --queue -n fs-collapse-bnm01-s$s -S preset=collapse_cpu -S seed=$s -S qat.bn_momentum=0.1; done
# ... and the failure on yolo10s at a second seed.
dvc exp run --queue -n fs-collapse-10s-s1 -S preset=collapse_cpu -S seed=1 -S model=yolo10s
# ... and BN re-estimation (the remedy that held on yolo10n) on the yolo10s failure.
dvc exp run --queue -n rem-bnre-10s-s0 -S preset=collapse_cpu -S seed=0 -S model=yolo10s -S qat.bn_reestimate=16
