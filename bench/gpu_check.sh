#!/usr/bin/env bash
# One GPU session, no network: install the peers' wheels from ./.whl/, install the project,
# run bench/gpu_check.py, bench/engine_check.py, then bench/bench_kernels.py. Everything lands in OUTDIR; the whole script
# ends within 8 minutes (each step has a timeout; what a cut-short step wrote is kept).
#
#   bash bench/gpu_check.sh OUTDIR          # kernels, engine, benchmarks (the first call of a GPU session)
#   bash bench/gpu_check.sh OUTDIR 7b       # same set-up, then only bench/memory_7b.py (a second call)
#   bash bench/gpu_check.sh OUTDIR 7b 220   # the same within 220 s: keep it 10-20 s under the call's timeout
#   bash bench/gpu_check.sh OUTDIR trl 280  # same set-up, then only bench/vs_trl.py: QLoRA on a Mistral-7B
#                                           # shape against TRL under a 24 GiB cap (a session's second call)
set -u

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [all|7b|trl] [SECONDS]}
MODE=${2:-all}
case "$MODE" in all | 7b | trl) ;; *)
    echo "mode must be all, 7b or trl, not $MODE" >&2
    exit 2
    ;;
esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1 # the repository root
REPO=$(pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TOTAL=480 # seconds for the whole script
[ "$MODE" != "all" ] && TOTAL=290 # the second call of a session, under a 300 s limit
TOTAL=${3:-$TOTAL}             # what the machine's time left allows
SECONDS=0

left() { echo $((TOTAL - SECONDS - ${1:-0})); }
log() { echo "[gpu_check.sh ${SECONDS}s] $*" | tee -a "$OUT/gpu_check_sh.log"; }

# 1. Peers (liger-kernel, cut-cross-entropy, bitsandbytes) from local wheels into a private
#    target dir: --no-deps, so torch and triton of the machine stay as they are.
PEERS=$(mktemp -d /tmp/selfee_peers.XXXXXX) # not under OUT: OUT is meant to be copied back
# A lent machine may send back only 8 files from OUT: pip's logs and the machine facts go
# into gpu_check_sh.log, so OUT holds 8 files after a full run (3 in 7b mode).
SCRATCH=$(mktemp -d /tmp/selfee_scratch.XXXXXX)
SHIM=""
trap 'rm -rf "$PEERS" "$SCRATCH" ${SHIM:+"$SHIM"}' EXIT
keep_log() { # keep_log NAME FILE [LINES]: the tail of a scratch log, into gpu_check_sh.log
    { echo "---- $1 (last ${3:-40} lines)"; tail -n "${3:-40}" "$2"; } >>"$OUT/gpu_check_sh.log"
}
if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $PEERS"
    timeout -k 5 90 "$PY" -m pip install --no-index --no-deps --disable-pip-version-check \
        --target "$PEERS" .whl/*.whl >"$SCRATCH/pip_peers.log" 2>&1 ||
        log "peer wheel install failed (pip's log below); benchmarks will say 'not installed'"
    keep_log "pip install of the peers' wheels" "$SCRATCH/pip_peers.log"
    export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"
else
    log "no .whl/ folder: peers will show as 'not installed'"
fi

# 2. The project. Editable install first; if pip refuses (no setuptools, externally managed
#    Python), fall back to a shim package: kernels/ ships as selfee_fast.kernels, so putting
#    the repository itself on PYTHONPATH would not find it.
check_import() { (cd / && "$PY" -c "import selfee_fast.kernels.config, selfee_fast" >/dev/null 2>&1); }
log "pip install --no-deps --no-build-isolation -e ."
if ! timeout -k 5 120 "$PY" -m pip install --no-deps --no-build-isolation --disable-pip-version-check -e . \
    >"$SCRATCH/pip_project.log" 2>&1 || ! check_import; then
    keep_log "pip install -e ." "$SCRATCH/pip_project.log"
    SHIM=$(mktemp -d /tmp/selfee_shim.XXXXXX)
    log "editable install unusable (pip's log above); using a shim package in $SHIM"
    mkdir -p "$SHIM/selfee_fast"
    ln -s "$REPO"/selfee_fast/*.py "$SHIM/selfee_fast/"
    ln -s "$REPO/kernels" "$SHIM/selfee_fast/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    check_import || log "selfee_fast still does not import: the runs below will fail"
fi

# 3. What machine is this.
{
    echo "## nvidia-smi"
    timeout 20 nvidia-smi
    echo "## versions"
    timeout 60 "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for dist in ("triton", "liger-kernel", "cut-cross-entropy", "bitsandbytes", "transformers", "peft", "trl", "datasets",
             "selfee-fast"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
    echo "## git"
    git -C "$REPO" log -1 --oneline 2>/dev/null
    git -C "$REPO" status --short 2>/dev/null | head -20
} >"$SCRATCH/env.txt" 2>&1
cat "$SCRATCH/env.txt"
keep_log "machine (nvidia-smi, versions, git)" "$SCRATCH/env.txt" 200

if [ "$MODE" = "7b" ]; then
    BUDGET=$(left 10)
    log "memory_7b.py (timeout ${BUDGET}s)"
    timeout -k 10 "$BUDGET" "$PY" bench/memory_7b.py --out "$OUT" 2>&1 | tee "$OUT/memory_7b.log"
    log "memory_7b.py exit ${PIPESTATUS[0]} (124: timed out; memory_7b-cuda.json holds the variants finished)"
    ls -la "$OUT" | tee -a "$OUT/gpu_check_sh.log"
    exit 0
fi

if [ "$MODE" = "trl" ]; then
    # One case, the issue's: a Mistral-7B shape, QLoRA, 2 pairs of 2048 tokens a step, within 24 GiB.
    # selfee_fast runs first, so a call cut short during TRL keeps its numbers (the JSON is
    # rewritten after every process).
    ENGINES="selfee_fast trl"
    if ! (cd / && "$PY" -c "import trl" >/dev/null 2>&1); then
        log "trl does not import (carry trl, datasets, dill and multiprocess wheels in .whl/): selfee_fast alone"
        ENGINES="selfee_fast"
    fi
    BUDGET=$(left 10)
    log "vs_trl.py (timeout ${BUDGET}s)"
    # shellcheck disable=SC2086 # ENGINES is a list of words
    timeout -k 10 "$BUDGET" "$PY" bench/vs_trl.py --model mistral-7b --quantization 4bit --memory-cap-gb 24 \
        --seq-len 2048 --pairs 2 --steps 3 --rounds 1 --throughput --new-tokens 64 --engines $ENGINES \
        --out "$OUT" 2>&1 | tee "$OUT/vs_trl.log"
    log "vs_trl.py exit ${PIPESTATUS[0]} (124: timed out; vs_trl-cuda-mistral-7b.json holds the processes finished)"
    ls -la "$OUT" | tee -a "$OUT/gpu_check_sh.log"
    exit 0
fi

# 4. Correctness + launch-config sweep: at most 190 s, and never eating into the 300 s kept
#    for engine_check.py and bench_kernels.py. Inside, the log-prob cases start no new case after
#    100 s and the sweep no new config after 60 s (first calls are mostly Triton compilation
#    on a fresh machine).
BUDGET=$(($(left 300) < 190 ? $(left 300) : 190))
if [ "$BUDGET" -gt 30 ]; then
    log "gpu_check.py (timeout ${BUDGET}s)"
    timeout -k 10 "$BUDGET" "$PY" bench/gpu_check.py --out "$OUT" --check-budget 100 --sweep-budget 60 2>&1 |
        tee "$OUT/gpu_check.log"
    log "gpu_check.py exit ${PIPESTATUS[0]} (124: timed out)"
else
    log "setup took too long: no time left for gpu_check.py"
fi

# 5. The engine end to end in bf16 (stage 0 + one SPA iteration on a ~47M Llama): at most
#    100 s, keeping 200 s for bench_kernels.py.
BUDGET=$(($(left 200) < 100 ? $(left 200) : 100))
if [ "$BUDGET" -gt 30 ]; then
    log "engine_check.py (timeout ${BUDGET}s)"
    timeout -k 10 "$BUDGET" "$PY" bench/engine_check.py --out "$OUT" 2>&1 | tee "$OUT/engine_check.log"
    log "engine_check.py exit ${PIPESTATUS[0]} (124: timed out)"
else
    log "no time left for engine_check.py"
fi

# 6. The benchmark, with whatever time is left (minus 10 s to finish cleanly).
BUDGET=$(left 10)
if [ "$BUDGET" -gt 30 ]; then
    log "bench_kernels.py (timeout ${BUDGET}s)"
    timeout -k 10 "$BUDGET" "$PY" bench/bench_kernels.py --device cuda --out "$OUT" --budget-s $((BUDGET - 20)) 2>&1 |
        tee "$OUT/kernels.log"
    log "bench_kernels.py exit ${PIPESTATUS[0]} (124: timed out; kernels-cuda.json holds the shapes finished)"
else
    log "no time left for bench_kernels.py"
fi

log "done; files in $OUT:"
ls -la "$OUT" | tee -a "$OUT/gpu_check_sh.log"
