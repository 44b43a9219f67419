#!/usr/bin/env bash
# Idempotent set-up of .venv: torch (CPU 2.13.0 unless a CUDA torch is already installed),
# the project with its test extras, and MinkowskiEngine 0.5.4 built once from PyPI's sdist
# and cached as a wheel. A second run checks a stamp and returns in about a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${M2SKD_VENV:-$ROOT/.venv}"
CACHE="${M2SKD_CACHE:-$HOME/.cache/m2skd}"
ME_VERSION=0.5.4
PY="${PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }

system_cuda_torch() {
  "$PY" - <<'PYEOF' 2>/dev/null
import torch, sys
sys.exit(0 if torch.version.cuda else 1)
PYEOF
}

stamp_key() {
  cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/build_minkowski.py" | sha256sum | cut -c1-16
}

STAMP="$VENV/.m2skd-setup-$(stamp_key)"
if [[ -f "$STAMP" ]]; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  if system_cuda_torch; then
    log "CUDA PyTorch found in $PY: the venv will see system site-packages"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"  # ninja from the venv for the MinkowskiEngine build
"$VPY" -m pip install -q --upgrade pip setuptools wheel ninja >&2

if ! "$VPY" -c "import torch" 2>/dev/null; then
  log "installing torch==2.13.0 (CPU wheel)"
  "$VPY" -m pip install -q torch==2.13.0 >&2
fi
log "installing m2skd (editable) with test extras"
"$VPY" -m pip install -q -e "$ROOT[test]" >&2

if ! "$VPY" -c "import m2skd.models.me_compat as c; c.import_minkowski()" 2>/dev/null; then
  if "$VPY" "$ROOT/scripts/build_minkowski.py" --version "$ME_VERSION" --cache "$CACHE"; then
    :
  elif [[ "${M2SKD_REQUIRE_MINKOWSKI:-0}" == "1" ]]; then
    log "MinkowskiEngine is required (M2SKD_REQUIRE_MINKOWSKI=1) but could not be built"; exit 1
  else
    log "WARNING: MinkowskiEngine could not be built; the pure-PyTorch backend will be used"
  fi
fi
rm -f "$VENV"/.m2skd-setup-*
touch "$STAMP"
log "ready: $VENV"
