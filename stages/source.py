"""DVC stage source: validate the whole params.yaml, check the devices it names (device,
evaluate.device) against this machine, write it resolved -> results/resolved_params.yaml, and
fingerprint the files data.path names -> data/source.json.

It runs on every ``dvc exp run`` (``always_changed``), so a params.yaml with an unknown key
(``-S +foo=1``) or a device this machine lacks (``-S device=0`` on a CPU machine) fails here,
in one line and before any stage trains, even when no stage depends on that key; and prepare,
which depends on data/source.json, re-runs exactly when the source data changed on disk.
prepare and train_fp depend on the resolved keys they read (a preset's values, the FP seed), not
on params.yaml's ``preset`` and ``seed``: runs that differ only in the QAT seed share one FP model
(DVC's run-cache).
"""

from yoloqat.paths import RESOLVED_PARAMS, SOURCE_FINGERPRINT
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    from yoloqat.data.source import source_fingerprint
    from yoloqat.provenance import write_json, write_resolved_params

    write_resolved_params(RESOLVED_PARAMS, cfg)
    fingerprint = source_fingerprint(cfg.data, cfg.root)
    write_json(SOURCE_FINGERPRINT, fingerprint)
    print(f"source: {fingerprint['source']} data, {fingerprint['files']} files, "
          f"fingerprint {fingerprint['sha256'][:12]}")


if __name__ == "__main__":
    # Not staged: each output is written atomically (write_json: a temp file, then a rename),
    # and the fingerprint hashes the data's paths under cfg.root, which must stay the real root.
    raise SystemExit(run_stage(
        "source", job, lambda cfg: [SOURCE_FINGERPRINT, RESOLVED_PARAMS], staged=False,
        devices=["device", "evaluate.device"],
    ))
