#!/usr/bin/env bash
# The remedies table on the failure (collapse_cpu, seeds 0-2): the runs queued by
# reports/failure_search/queue.sh.  Writes reports/remedies/README.md and curves.png.
set -euo pipefail
seeds() { local p=$1; echo "${p}-s0,${p}-s1,${p}-s2"; }
yoloqat remedies --title "Remedies on the failure (collapse_cpu, 3 seeds)" \
  --variant "none: plain QAT=live:$(seeds fs-collapse)" \
  --variant "EMA=ema:$(seeds fs-collapse)" \
  --variant "BN re-estimation of the EMA model=bnre:$(seeds rem-bnre)" \
  --variant "dampening 1e-4 (ramp)=live:$(seeds rem-damp)" \
  --variant "dampening 1e-4 (ramp) + EMA=ema:$(seeds rem-damp)" \
  --variant "freezing 0.01=live:$(seeds rem-freeze)" \
  --variant "freezing 0.01 + EMA=ema:$(seeds rem-freeze)" \
  --variant "BN momentum 0.1=live:$(seeds fs-collapse-bnm01)" \
  --variant "BN momentum 0.1 + EMA=ema:$(seeds fs-collapse-bnm01)" \
  "$@"
