"""The repair curves' per-epoch copy of a model: a new deep copy vs refreshing the one made before.

Every epoch the repair curves (``qat.repair_curves``) act on copies of the live and the EMA
model, one for BN re-estimation and one for QC: four copies an epoch.  ``copy.deepcopy`` of a
Brevitas model walks its ~7,000 quantizer modules; :class:`yoloqat.train.repairs.ScratchCopies`
deep-copies once and afterwards copies only the tensors into the same structure (the same model:
tests/test_repair_copies.py).  This times both on the same quantized model, interleaved round by
round so other load hits both alike, and prints the medians, their ratio and the seconds saved per
epoch (four copies).

    python benchmarks/repair_copy_cost.py [--model yolov10n.yaml] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.quant.convert import QuantRecipe, quantize_model
from yoloqat.train.repairs import ScratchCopies

COPIES_PER_EPOCH = 4  # live and EMA, each for BN re-estimation and for QC


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov10n.yaml")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    # the collapse_cpu quantizer: per-tensor, decoupled learned scales
    model = quantize_model(DetectionModel(args.model, nc=6, verbose=False),
                           QuantRecipe(granularity="per_tensor", scaling="decoupled"))
    copies = ScratchCopies()
    copies.of("ema", "qc", model)
    deep, refresh = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        copy.deepcopy(model)
        deep.append(time.perf_counter() - t)
        with torch.no_grad():  # the model trains on between epochs
            next(model.parameters()).add_(1e-3)
        t = time.perf_counter()
        copies.of("ema", "qc", model)
        refresh.append(time.perf_counter() - t)
    d, r = statistics.median(deep), statistics.median(refresh)
    print(f"{args.model}: deep copy {d * 1000:.0f} ms, refresh {r * 1000:.0f} ms (median of "
          f"{args.rounds}); ratio {d / r:.1f}x; saved per epoch {COPIES_PER_EPOCH * (d - r):.2f} s")


if __name__ == "__main__":
    main()
