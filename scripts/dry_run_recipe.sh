#!/usr/bin/env bash
# Dry run of the real SemanticKITTI recipe (configs/semantickitti.yaml) on CPU, so it cannot rot:
# 64-beam synthetic scans, prepare, 2 steps of the teacher, cache-teacher, 2 steps of the student,
# all with the recipe's model and 0.05 m voxels; only the run length and batch are overridden.
# Prints time per step and peak RSS for teacher and student; exits non-zero if a stage fails.
#
#   scripts/dry_run_recipe.sh [WORK_DIR]      (default: a fresh temporary directory)
#   BACKEND=torch|minkowski|auto (default torch), FRAMES=scans per sequence (default 3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="${1:-$(mktemp -d -t m2skd-dry-run.XXXXXX)}"
BACKEND="${BACKEND:-torch}"
FRAMES="${FRAMES:-3}"
mkdir -p "$WORK"
cd "$ROOT"
m2skd() { "$PY" -m m2skd "$@"; }

# The recipe as shipped, shortened: a fixed step count instead of epochs, one scan per step,
# no loader processes and no validation (2 steps say nothing about accuracy).
SHORT=(--config semantickitti --set steps=2 --set epochs=none --set batch_size=1 --set workers=0
       --set val_every=0 --set log_every=1 --backend "$BACKEND" --device cpu --overwrite)

# measure NAME CMD...: run CMD, keep its output in $WORK/NAME.log, then print its wall time, the
# seconds per training step it reported (if any) and the peak RSS of its largest process.
measure() {
  local name=$1; shift
  "$PY" - "$WORK/$name.log" "$@" <<'PYEOF'
import re, resource, subprocess, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
with open(log, "w") as fh:
    rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
wall = time.perf_counter() - t0
text = open(log).read()
if rc:
    sys.stdout.write(text[-3000:])
    sys.exit(f"dry run: {cmd[3] if len(cmd) > 3 else cmd} failed (exit {rc}); log {log}")
peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
steps = re.search(r"^\s*steps: (\d+)", text, re.M)
seconds = re.search(r"^\s*seconds: ([\d.e+-]+)", text, re.M)
per_step = f", {float(seconds.group(1)) / int(steps.group(1)):.2f} s/step" if steps and seconds and int(steps.group(1)) else ""
print(f"{cmd[3]:<14} wall {wall:6.1f} s{per_step}, peak RSS {peak_mb:.0f} MiB")
PYEOF
}

echo "dry run of configs/semantickitti.yaml in $WORK (backend $BACKEND, $FRAMES scans per sequence)"
m2skd synth "$WORK/data" --sequences 00,08 --frames "$FRAMES" --beams 64 --jobs 2 > "$WORK/synth.log" 2>&1
m2skd prepare "$WORK/data" "$WORK/run" --jobs 1 > "$WORK/prepare.log" 2>&1
measure teacher "$PY" -m m2skd train-teacher "$WORK/run" "${SHORT[@]}"
measure cache "$PY" -m m2skd cache-teacher "$WORK/run" --backend "$BACKEND" --device cpu --overwrite
measure student "$PY" -m m2skd train-student "$WORK/run" "${SHORT[@]}"
echo "dry run passed: teacher, cache and student ran with the real recipe's model (logs in $WORK)"
