#!/usr/bin/env bash
# The memory plan's and the planners' printed figures, saved and compared before and after a change.
#   scripts/compare_dry_runs.sh save DIR      # run every dry run below from this checkout into DIR
#   scripts/compare_dry_runs.sh compare DIR   # run them again into a temporary folder and diff against DIR
# Every shipped recipe's `run --dry-run` (table and --json), the recipes on other hardware, `prune --dry-run`, and
# the plan benchmarks/scale_rehearsal.py predicts from (its tiny checkpoint, dry-run only: nothing is trained).
# In the JSON, keys listed in DROP_KEYS (fields removed on purpose) are left out of both sides before the diff.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false COLUMNS=200
DROP_KEYS=${DROP_KEYS:-today,runnable}
mode=${1:?save or compare}; dir=${2:?folder}
out=$dir; [ "$mode" = compare ] && out=$(mktemp -d)
mkdir -p "$out"
cli() { python -m minipuzzle.cli "$@"; }
save() {  # name, command...: stdout and stderr (a refusal is output too) and the exit code
    local name=$1; shift
    { "$@" >"$out/$name.out" 2>"$out/$name.err"; echo $? >"$out/$name.rc"; } || true
}
for r in recipes/*.yaml; do
    n=$(basename "$r" .yaml)
    save "run-$n" cli run "$r" --dry-run
    save "run-$n.json" cli run "$r" --dry-run --json
    save "run-$n-80g.json" cli run "$r" --dry-run --json --gpu-memory 80GiB --gpus 8 --host-memory 512GiB
    save "run-$n-kernels.json" cli run "$r" --dry-run --json --gpu-memory 80GiB --gpus 8 --mamba-kernels
    save "run-$n-24g.json" cli run "$r" --dry-run --json --gpu-memory 24GiB --gpus 2 --host-memory 64GiB
    save "run-$n-cpu4g.json" cli run "$r" --dry-run --json --host-memory 4GiB
done
save prune-56b cli prune 56b --target 47b --dry-run
save prune-56b-mem cli prune 56b --memory 31.7GiB --precision fp4 --context 1M --step ffn=1024 --min-width 0.75 --dry-run
save prune-demo cli prune demo --target 0.83 --axes depth,ffn --samples 32 --seq-len 256 --dry-run
save prune-demo-80g cli prune demo --target 0.83 --dry-run --gpu-memory 80GiB --gpus 8
save info-56b cli info 56b --precision fp4 --context 1M
work=${TMPDIR:-/tmp}/compare_dry_runs_work  # one fixed path: the plan prints the checkpoint's path
save scale-rehearsal.json python - "$work" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import scale_rehearsal as sr
work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
n, ckpt_bytes = (sr.write_checkpoint(work / "ckpt", "tiny") if not (work / "ckpt" / "config.json").is_file()
                 else (0, sum(f.stat().st_size for f in (work / "ckpt").glob("*.safetensors"))))
doc = sr.recipe(work / "ckpt", int(sr.DEVICE_FRACTION * ckpt_bytes), "tiny")
doc["hardware"]["device"] = "cpu"
f = sr._write_recipe(work, "recipe", doc, int(sr.DEVICE_FRACTION * ckpt_bytes))
plan = sr.dry_run(f, Path.cwd())
preds = sr.predictions(plan)
print(json.dumps({"predictions": preds, "stage_hardware": sr.stage_hardware(preds, int(sr.DEVICE_FRACTION * ckpt_bytes)),
                  "plan_baselines": sr.plan_baselines(), "plan": plan}, indent=1, sort_keys=True))
PY
[ "$mode" = save ] && { echo "saved $(ls "$out" | wc -l) files into $out"; exit 0; }
strip() {  # a JSON file without the DROP_KEYS, else the file as it is
    python - "$1" "$DROP_KEYS" <<'PY' 2>/dev/null || cat "$1"
import json, sys
drop = set(sys.argv[2].split(","))
def walk(x):
    if isinstance(x, dict):
        return {k: walk(v) for k, v in x.items() if k not in drop}
    return [walk(v) for v in x] if isinstance(x, list) else x
print(json.dumps(walk(json.load(open(sys.argv[1]))), indent=1, sort_keys=True))
PY
}
status=0
for f in "$dir"/*; do
    b=$(basename "$f")
    if [[ $b == *.json.out ]]; then
        diff <(strip "$f") <(strip "$out/$b") >/dev/null || { echo "DIFFERS: $b"; diff <(strip "$f") <(strip "$out/$b") | head -20; status=1; }
    else
        cmp -s "$f" "$out/$b" || { echo "DIFFERS: $b"; diff "$f" "$out/$b" | head -20; status=1; }
    fi
done
[ $status = 0 ] && echo "identical: $(ls "$dir" | wc -l) files (JSON without: $DROP_KEYS)"
rm -rf "$out"
exit $status
