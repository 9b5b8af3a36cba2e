"""DVC stage source: validate the whole params.yaml, check the devices it names (device,
evaluate.device) against this machine, and fingerprint the files data.path names
-> data/source.json.

It runs on every ``dvc exp run`` (``always_changed``), so a params.yaml with an unknown key
(``-S +foo=1``) or a device this machine lacks (``-S device=0`` on a CPU machine) fails here,
in one line and before any stage trains, even when no stage depends on that key; and prepare,
which depends on data/source.json, re-runs exactly when the source data changed on disk.
"""

from yoloqat.paths import SOURCE_FINGERPRINT
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    from yoloqat.data.source import source_fingerprint
    from yoloqat.provenance import write_json

    fingerprint = source_fingerprint(cfg.data, cfg.root)
    write_json(SOURCE_FINGERPRINT, fingerprint)
    print(f"source: {fingerprint['source']} data, {fingerprint['files']} files, "
          f"fingerprint {fingerprint['sha256'][:12]}")


if __name__ == "__main__":
    # Not staged: its one output is written atomically (write_json: a temp file, then a rename),
    # and the fingerprint hashes the data's paths under cfg.root, which must stay the real root.
    raise SystemExit(run_stage(
        "source", job, lambda cfg: [SOURCE_FINGERPRINT], staged=False,
        devices=["device", "evaluate.device"],
    ))
