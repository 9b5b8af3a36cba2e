#!/usr/bin/env bash
# The failure search on the embedded data (yolo10n, 96 px, 480 train images, seed 0, CPU):
# queue every row, then `dvc queue start` and, when they are done,
#   yoloqat search fs-ref-cpu fs-ref-fp fs-ref-fp-swd05 fs-ref-fp-maxabs fs-ref-fp-pc-swd05 fs-ref-fp-w3
# writes reports/failure_search/README.md and curves.png.
set -euo pipefail

# Row 1: the reference recipe as closely as the project expresses it, cut to one CPU run
# (yoloqat/presets.py: scratch init, SGD 0.01 / lrf 0.9 over 30 epochs = the reference's first
# 30 of 300 epochs, momentum 0.937, wd 5e-4, warm-up 3, mosaic 1.0, Brevitas decoupled per-tensor
# int4 on every conv, learned scales decayed like weights, AMP (a no-op on CPU)).
dvc exp run --queue -n fs-ref-cpu -S preset=reference_cpu

# The same recipe from the trained FP model, 15 epochs (one factor: init).  Spelled out with
# preset=none: a preset only fills keys left at their default, and qat.init=fp is the default.
FROM_FP=(-S qat.epochs=15 -S qat.optimizer=SGD -S qat.lr0=0.01 -S qat.lrf=0.9 -S qat.momentum=0.937
         -S qat.weight_decay=0.0005 -S qat.warmup_epochs=3.0 -S qat.mosaic=1.0 -S qat.close_mosaic=0
         -S qat.amp=true -S qat.bits=4 -S fp.control=false)
DECOUPLED=(-S qat.granularity=per_tensor -S qat.scaling=decoupled)
dvc exp run --queue -n fs-ref-fp "${FROM_FP[@]}" "${DECOUPLED[@]}" -S qat.scale_weight_decay=0.0005
# The scale decay accelerated 100x (README "Looking for the collapse": before a BatchNorm only
# weight decay moves a per-tensor learned scale, so 0.05 over ~900 steps shrinks it about as much
# as the reference's 0.0005 did over its first ~10^5 steps).
dvc exp run --queue -n fs-ref-fp-swd05 "${FROM_FP[@]}" "${DECOUPLED[@]}" -S qat.scale_weight_decay=0.05
# One factor each, from fs-ref-fp: the project's max-abs quantizer (no learned scale to decay)...
dvc exp run --queue -n fs-ref-fp-maxabs "${FROM_FP[@]}" -S qat.granularity=per_tensor -S qat.scaling=maxabs
# ... per-channel decoupled scales with the accelerated decay ...
dvc exp run --queue -n fs-ref-fp-pc-swd05 "${FROM_FP[@]}" -S qat.granularity=per_channel -S qat.scaling=decoupled -S qat.scale_weight_decay=0.05
# ... and 3-bit weights.
dvc exp run --queue -n fs-ref-fp-w3 "${FROM_FP[@]}" "${DECOUPLED[@]}" -S qat.scale_weight_decay=0.0005 -S qat.bits=3
