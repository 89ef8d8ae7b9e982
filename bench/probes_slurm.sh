#!/usr/bin/env bash
# Probes as their own SLURM job beside a training job that is requeued mid-run (the real local cluster of
# ../shared/slurm-ci/up.sh). Prints squeue with both jobs, the requeue, and the probe table at the end.
#     bash bench/probes_slurm.sh /tmp/probes-slurm
set -euo pipefail
OUT=${1:?usage: bench/probes_slurm.sh OUT_DIR}
T=$(cd "$(dirname "$0")/../../shared/data/tiles/nct_crc_he_100k_sample9" && pwd)
cd "$(dirname "$0")/.."
rm -rf "$OUT"
python launch/train.py --profile cpu-ci --nodes 1 --config configs/smoke.yaml train.output_dir="$OUT" \
  data.num_workers=0 train.rankme_every=0 train.log_every=1 train.steps=12 train.ckpt_every=2 train.keep_last=1 \
  probes.img_size=64 "probes.tasks=crc=$T,$T" | tee "$OUT.submit"
TRAIN=$(sed -n 's/^submitted job \([0-9]*\):.*/\1/p' "$OUT.submit"); PROBE=$(sed -n 's/^submitted probe job \([0-9]*\):.*/\1/p' "$OUT.submit")
echo "--- squeue right after submission"; squeue -j "$TRAIN,$PROBE" -o "%.6i %.22j %.9T %.10M %R"
until [ -e "$OUT/smoke/checkpoints/step_0000004" ] || [ -e "$OUT/smoke/checkpoints/step_0000006" ]; do sleep 1; done
echo "--- step 4 saved: squeue, then USR2 to the training job (what SLURM sends before a time limit)"
squeue -j "$TRAIN,$PROBE" -o "%.6i %.22j %.9T %.10M %R"; scancel --signal=USR2 "$TRAIN"
sleep 20; echo "--- 20 s later"; squeue -j "$TRAIN,$PROBE" -o "%.6i %.22j %.9T %.10M %R"
while squeue -h -j "$TRAIN,$PROBE" 2>/dev/null | grep -q .; do sleep 3; done
echo "--- both jobs done"; sacct -X -n -o JobID,JobName%22,State -j "$TRAIN,$PROBE"
grep -h "saved at step\|resuming from" "$OUT"/smoke/slurm/*_log.err || true
echo "--- eval/probes.jsonl (step task protocol status value)"
python - "$OUT/smoke/eval/probes.jsonl" <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows: print(r["step"], r["task"], r["protocol"], r["status"], round(r.get("value", float("nan")), 3), r["time"])
n = collections.Counter((r["step"], r["task"], r["protocol"]) for r in rows)
print("checkpoints probed:", sorted(s for s, _, _ in n), "| probed more than once:", [k for k, v in n.items() if v > 1] or "none")
PY
