#!/usr/bin/env bash
# One command for a machine with CUDA: the checks no CPU machine can make.
#   1. the CUDA tests (pytest -m cuda where that marker is registered, else tests named *cuda*)
#   2. short real-recipe training (configs/semantickitti.yaml's model, 64-beam synthetic scans at
#      0.05 m, the recipe's scans per GPU) on each backend: torch fp32, torch bf16, and
#      MinkowskiEngine if its CUDA build is installed; scans/s and peak GPU memory for each
#   3. two-rank DDP over NCCL through torchrun, if two GPUs are visible
#   4. m2skd bench --gpu (QUICK=1 adds --quick)
# then a summary. Without CUDA it stops at once with one line and exit status 2.
#
#   scripts/gpu_check.sh [WORK_DIR]     STEPS=steps per training row (default 12, at least 5)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="${1:-$ROOT/runs/gpu-check}"
STEPS="${STEPS:-12}"
cd "$ROOT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to PyTorch ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1 | tail -1)); nothing checked" >&2
  exit 2
fi
mkdir -p "$WORK"
declare -a SUMMARY=()
FAILED=0
record() {  # record NAME STATUS [DETAIL]
  SUMMARY+=("$(printf '%-22s %-5s %s' "$1" "$2" "${3:-}")")
  [[ "$2" == FAIL ]] && FAILED=1
}
section() { echo; echo "== $*"; }

section "device"
"$PY" - <<'PYEOF' | tee "$WORK/device.txt"
import torch
from m2skd.models.me_compat import minkowski_available
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s): "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
print(f"MinkowskiEngine installed: {minkowski_available()}")
PYEOF

section "CUDA tests"
if "$PY" -m pytest --markers 2>/dev/null | grep -q "^@pytest.mark.cuda"; then SELECT=(-m cuda); else SELECT=(-k cuda); fi
"$PY" -m pytest -q -rs "${SELECT[@]}" 2>&1 | tee "$WORK/pytest-cuda.log"
rc=${PIPESTATUS[0]}
last=$(grep -E "passed|failed|skipped|error|no tests ran" "$WORK/pytest-cuda.log" | tail -1)
if [[ $rc -eq 0 ]] && ! grep -q "skipped" <<<"$last"; then record "cuda tests" ok "$last"
elif [[ $rc -eq 0 ]]; then record "cuda tests" warn "$last: skip reasons in $WORK/pytest-cuda.log"
else record "cuda tests" FAIL "${last:-pytest exit $rc}"; fi

section "synthetic 64-beam data and prepare"
DATA="$WORK/data"; RUN="$WORK/run"
# synth once; prepare skips the shards it has already written
if [[ ! -d "$DATA/sequences" ]]; then
  "$PY" -m m2skd synth "$DATA" --sequences 00,08 --frames 16 --beams 64 --jobs "$(nproc)" >"$WORK/synth.log" 2>&1
fi
"$PY" -m m2skd prepare "$DATA" "$RUN" --jobs "$(nproc)" >"$WORK/prepare.log" 2>&1
rc=$?
if [[ $rc -ne 0 ]]; then
  record "synth+prepare" FAIL "see $WORK/synth.log, $WORK/prepare.log"
else
  record "synth+prepare" ok "$DATA -> $RUN"
  section "real-recipe training on each backend ($STEPS steps each)"
  STEPS="$STEPS" "$PY" - "$RUN" "$WORK/train_rows.txt" <<'PYEOF'
import dataclasses, sys, time
import torch
from m2skd.models.me_compat import import_minkowski, minkowski_available
from m2skd.train_config import TrainConfig, load_config
from m2skd.trainer import train
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache

run, out = sys.argv[1], sys.argv[2]
steps = int(__import__("os").environ["STEPS"])
recipe = load_config("semantickitti")
short = dict(steps=steps, val_every=0, checkpoint_every=10**9, log_every=1, workers=4)
if "epochs" in TrainConfig.__dataclass_fields__:
    short["epochs"] = None
rows = []

def timed_train(role, name, **changes):
    """Train `steps` steps; scans/s between the warm-up and the final (checkpointing) step, peak GPU memory."""
    cfg = dataclasses.replace(recipe, **short, **changes)
    stamps = []
    def callback(step, total, logs):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = train(run, role, cfg, name=name, overwrite=True, device="cuda", callback=callback)
    timed = stamps[:-1]  # the last step also writes the checkpoint
    warm = 2  # first steps: allocator growth, cuDNN/cuBLAS set-up
    rate = cfg.batch_size * (len(timed) - 1 - warm) / (timed[-1] - timed[warm]) if len(timed) - 1 > warm else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30
    row = f"{role:<8} {cfg.backend:<10} {cfg.amp:<5} batch {cfg.batch_size:>2}: {rate:7.2f} scans/s, peak {peak:6.2f} GiB"
    print(row, flush=True)
    rows.append(row)
    return result

failed = False
teacher = timed_train("teacher", "gpu-teacher", backend="torch", amp="none")
run_cache(run, teacher["checkpoint"], CacheConfig(backend="torch", device="cuda"), overwrite=True)
backends = [("torch", "none"), ("torch", "bf16")]
if minkowski_available() and getattr(import_minkowski(), "is_cuda_available", lambda: False)():
    backends.append(("minkowski", "none"))
else:
    rows.append("student  minkowski  none : skipped (no CUDA build of MinkowskiEngine installed)")
for backend, amp in backends:
    try:
        timed_train("student", f"gpu-{backend}-{amp}", backend=backend, amp=amp)
    except Exception as exc:  # report every backend, then fail
        failed = True
        rows.append(f"student  {backend:<10} {amp:<5}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        print(rows[-1], flush=True)
open(out, "w").write("\n".join(rows) + "\n")
sys.exit(1 if failed else 0)
PYEOF
  rc=$?
  while IFS= read -r line; do
    case "$line" in *FAILED*) st=FAIL ;; *skipped*) st=skip ;; *) st=ok ;; esac
    record "train" "$st" "$line"
  done < <(cat "$WORK/train_rows.txt" 2>/dev/null)
  [[ $rc -ne 0 && ! -s "$WORK/train_rows.txt" ]] && record "train" FAIL "training script exit $rc"

  section "two-rank DDP over NCCL"
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  if [[ "$GPUS" -ge 2 ]]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m m2skd train-student "$RUN" \
      --set steps="$STEPS" --set epochs=none --set val_every=0 --set workers=4 --backend torch \
      --device cuda --name gpu-ddp --overwrite 2>&1 | tee "$WORK/ddp.log"
    rc=${PIPESTATUS[0]}
    if [[ $rc -eq 0 ]] && "$PY" -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['world_size'] != 2)" "$RUN/gpu-ddp/train.json" 2>/dev/null; then
      record "ddp nccl x2" ok "$(grep -E '^\s*seconds:' "$WORK/ddp.log" | tail -1 | xargs) for $STEPS steps"
    else
      record "ddp nccl x2" FAIL "exit $rc; see $WORK/ddp.log"
    fi
  else
    record "ddp nccl x2" skip "$GPUS GPU visible"
  fi
fi

section "m2skd bench --gpu"
BENCH_ARGS=(--gpu --out "$WORK/bench")
[[ "${QUICK:-0}" == 1 ]] && BENCH_ARGS+=(--quick)
"$PY" -m m2skd bench "${BENCH_ARGS[@]}" 2>&1 | tee "$WORK/bench.log"
rc=${PIPESTATUS[0]}
if [[ $rc -eq 0 ]]; then record "bench --gpu" ok "$(grep -o 'written .*' "$WORK/bench.log" | tail -1)"
else record "bench --gpu" FAIL "exit $rc; see $WORK/bench.log"; fi

section "summary ($(head -1 "$WORK/device.txt"))"
printf '%s\n' "${SUMMARY[@]}"
if [[ $FAILED -ne 0 ]]; then echo "gpu_check: FAILED (logs in $WORK)"; exit 1; fi
echo "gpu_check: all checks passed (logs in $WORK)"
