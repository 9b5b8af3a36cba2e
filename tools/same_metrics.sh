#!/usr/bin/env bash
# The same tiny pipeline (48 train images, 3 FP + 3 QAT epochs) at commit OLD and at HEAD, then
# every stage's metrics.json compared (timing fields differ run to run; everything else must not).
# Usage: tools/same_metrics.sh OLD_COMMIT [KEY=VALUE ...]   (about 5 min on 2 cores; clones into
# /tmp/eq-old, /tmp/eq-new). KEY=VALUE set params in both, after the tiny sizes, as `dvc exp run -S`
# would (dotted keys, YAML values), e.g. preset=collapse_cpu qat.epochs=3 for SGD + learned scales.
OLD=${1:?usage: tools/same_metrics.sh OLD_COMMIT [KEY=VALUE ...]}
shift
export SAME_METRICS_SET="$*"
REPO=$(git rev-parse --show-toplevel)
set -e
export PATH=$REPO/.venv/bin:$PATH OMP_NUM_THREADS=1 GIT_AUTHOR_NAME=y GIT_COMMITTER_NAME=y GIT_AUTHOR_EMAIL=y@l GIT_COMMITTER_EMAIL=y@l
for tag in old new; do
  rm -rf /tmp/eq-$tag; git clone -q "$REPO" /tmp/eq-$tag
  cd /tmp/eq-$tag; [ $tag = old ] && git checkout -q "$OLD"
  python - <<'PY'
import yaml
d=yaml.safe_load(open('params.yaml'))
d['data'].update(train_images=48, val_images=16, calib_images=16)
d['fp']['epochs']=3; d['qat']['epochs']=3
import os
for item in os.environ["SAME_METRICS_SET"].split():
    key, _, value = item.partition("=")
    *path, last = key.split(".")
    node = d
    for part in path:
        node = node[part]
    node[last] = yaml.safe_load(value)
yaml.safe_dump(d, open('params.yaml','w'), sort_keys=False)
PY
  git commit -qam tiny
  PYTHONPATH=/tmp/eq-$tag/src dvc repro -q > /tmp/eq-$tag.log 2>&1 || { echo "$tag failed"; tail -5 /tmp/eq-$tag.log; }
done
python - <<'PY'
import glob, json, re, sys
timing = re.compile(r"seconds|latency|throughput|images_per_s|loop_s|time_ratio")
def flat(d, p=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{p}{k}.") if isinstance(v, dict) else {p + k: v})
    return out
bad = 0
for new in sorted(glob.glob("/tmp/eq-new/results/*/metrics.json")):
    rel = new.removeprefix("/tmp/eq-new/")
    a, b = flat(json.load(open("/tmp/eq-old/" + rel))), flat(json.load(open(new)))
    keys = sorted(k for k in set(a) | set(b) if not timing.search(k))
    diff = [k for k in keys if a.get(k) != b.get(k)]
    bad += len(diff)
    print(f"{rel}: {len(keys) - len(diff)} of {len(keys)} non-timing values identical", *diff)
sys.exit(1 if bad else 0)
PY
