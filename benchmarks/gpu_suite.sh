#!/usr/bin/env bash
# The GPU suite in one command (issue 17): install the carried wheels, check the GPU, run
# benchmarks/gpu_suite.py, leave gpu_suite.json, gpu_suite.md and gpu_suite.log in $OUT.
#
# On the device machine (one `run` call; the wheels come from `bash benchmarks/gpu_wheels.sh`
# run here first, and travel with carry [".whl"]):
#     DREAMER4_COMMIT=<sha> bash benchmarks/gpu_suite.sh            # about 6 minutes on one H100
# Here, on CPU, every part at tiny sizes:
#     bash benchmarks/gpu_suite.sh --smoke
# Extra arguments go to gpu_suite.py (--parts a,b  --total-s N  --budget-scale X).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
SMOKE=0
for a in "$@"; do [ "$a" = "--smoke" ] && SMOKE=1; done

t0=$(date +%s)
if [ "$SMOKE" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # smoke runs here, with the project's own venv
  echo "[suite.sh] installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl 2>&1 | tail -5
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "[suite.sh] setup took $(( $(date +%s) - t0 )) s"

if [ "$SMOKE" = 0 ]; then
  # Craftax builds its texture cache (in its package folder) on first use: about a minute of one
  # CPU core. gpu_wheels.sh carries the cache; without it, build it now on the CPU backend (no GPU
  # memory taken) while the train parts run. The parts that render wait for texture_cache.done.
  TEX=$("$PY" -c 'import os, craftax.craftax_classic as m; print(os.path.join(os.path.dirname(m.__file__), "assets", "texture_cache_classic.pbz2"))' 2>/dev/null)
  if [ -n "$TEX" ] && [ -f .whl/texture_cache_classic.pbz2 ]; then
    cp .whl/texture_cache_classic.pbz2 "$TEX" && echo "[suite.sh] Craftax texture cache installed from .whl"
  else
    (JAX_PLATFORMS=cpu "$PY" -c 'from craftax.craftax_classic import constants as c; from dreamer4.data.env import texture_cache; texture_cache(c)' \
        > "$OUT/craftax_textures.log" 2>&1; touch "$OUT/texture_cache.done") &
    export DREAMER4_TEXTURES_PENDING="$OUT/texture_cache.done"
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if ! "$PY" -c 'import jax, sys; d = jax.devices(); print("[suite.sh] jax", jax.__version__, d); sys.exit(d[0].platform != "gpu")'; then
    echo "[suite.sh] jax.devices() shows no GPU; the suite goes on and its env part records the failure"
  fi
  "$PY" -c 'import craftax, grain, dreamer4; print("[suite.sh] imports ok: craftax, grain, dreamer4")' \
      || echo "[suite.sh] an import failed (missing wheel?); the parts will say which"
fi

"$PY" benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
rc=${PIPESTATUS[0]}
echo "[suite.sh] done in $(( $(date +%s) - t0 )) s (exit $rc); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
