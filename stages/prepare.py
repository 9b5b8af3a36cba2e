"""DVC stage prepare: params.data -> data/prepared (YOLO layout + manifest)."""

from yoloqat.paths import DATASET_DIR
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    from yoloqat.data import prepare_dataset

    # the FP seed (fp.seed, else seed): a grid over the QAT seed alone keeps one dataset
    manifest = prepare_dataset(
        cfg.data, cfg.fp_seed, DATASET_DIR, cfg.root, difficulty=cfg.data.difficulty
    )
    counts = {s: c.get("images") for s, c in manifest.get("splits", {}).items()}
    print(f"prepare: {manifest.get('source')} dataset, images per split {counts}, "
          f"hash {str(manifest.get('content_hash'))[:12]}")


if __name__ == "__main__":
    # No outputs to stage or clean: prepare_dataset builds data/prepared in a temp folder and
    # swaps it into place itself, so a failed or killed run leaves the previous dataset as it was.
    raise SystemExit(run_stage("prepare", job, lambda cfg: []))
