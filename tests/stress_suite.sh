#!/usr/bin/env bash
# The whole suite several times on a quiet machine, then several times beside a CPU-bound load (2 busy
# processes, as many as the CI machine's cores): every run must pass. A test that fails only under load decides
# by the wall clock or by the order of two processes' progress, which no test may (README, "Run the tests").
#
#   bash tests/stress_suite.sh                 # 5 quiet + 3 loaded runs of .ci/run (SLURM cluster up)
#   bash tests/stress_suite.sh 1 1 "python -m pytest -q tests/test_probes.py"      # quiet runs, loaded runs, command
#
# One line per run in runs/stress_suite.log (and on stdout): quiet/loaded, exit status, wall seconds, the load average
# at the end, pytest's summary line. Run it with nothing else on the machine: the quiet runs' times are the
# suite's times.
set -u
cd "$(dirname "$0")/.."
quiet=${1:-5}
loaded=${2:-3}
command=${3:-.ci/run}
mkdir -p runs
log=runs/stress_suite.log
out=$(mktemp)
busy=()
trap 'rm -f "$out"; for p in "${busy[@]}"; do kill "$p" 2>/dev/null; done' EXIT

one_run() {  # $1: quiet or loaded, $2: its number
  local start=$SECONDS rc
  bash -c "$command" >"$out" 2>&1
  rc=$?
  echo "$1 $2: rc=$rc $((SECONDS - start)) s, load $(cut -d' ' -f1-3 /proc/loadavg): $(grep -E '^[0-9]+ (passed|failed)|^[0-9]+ errors?|no tests ran' "$out" | tail -1)" | tee -a "$log"
  if [ "$rc" != 0 ]; then
    cp "$out" "runs/stress_suite.$1-$2.out"
    echo "  output kept in runs/stress_suite.$1-$2.out" | tee -a "$log"
  fi
}

echo "== $(date -u +%FT%TZ) $command: $quiet quiet, $loaded loaded ($(nproc) cores)" | tee -a "$log"
for i in $(seq 1 "$quiet"); do one_run quiet "$i"; done
for _ in 1 2; do python3 -c "while True: pass" & busy+=($!); done
for i in $(seq 1 "$loaded"); do one_run loaded "$i"; done
