#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still wait for, as device calls that each fit one
# session's 15 minutes of device time (a machine's start takes one to two of them).
#
#     bash benchmarks/gpu_checks/session.sh kernels   # issue 4: at most 9.5 minutes, likely 5
#     bash benchmarks/gpu_checks/session.sh sd3       # issue 5: at most 9 minutes
#     bash benchmarks/gpu_checks/session.sh flux      # issue 5: at most 9 minutes
#     bash benchmarks/gpu_checks/session.sh stepcache # RAS's step cache on GPU: at most 9 minutes
#
# Run `kernels` first; then `sd3` while the machine is warm if the device tool's status
# still has 9 minutes (often not: then the next lent session starts with it); `flux`
# (FLUX.1-dev's 12 B parameters, PixArt-Sigma) and `stepcache` another time. Each part runs its steps
# under their own time limits, in priority order, so a slow step loses its own result and
# not the rest; everything a call writes is packed into $OUT/results.tar.gz (the files
# under benchmarks/results/ it wrote, the pytest logs) next to $OUT/session.log (the
# device tool returns at most 8 files).
#
# The device image has torch and Triton but not diffusers. Before the first call, here:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
#
# and call the device tool with carry [".whl"] and timeout_s 590. `.whl/` is ignored
# by git (.gitignore). Outside this workplace (any CUDA machine with diffusers
# installed) the script runs the same; it installs nothing when .whl/ is absent.
set -uo pipefail
PART=${1:?usage: session.sh kernels|sd3|flux|stepcache}
OUT=${OUT:-out/session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
STARTED="$OUT/.started"
touch "$STARTED"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "session.sh: installing the carried wheels failed" | tee -a "$LOG"; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

FAILED=()
step() {  # step SECONDS NAME COMMAND...: run one step under its own limit, log its time and exit status
    local limit=$1 name=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 40
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

case "$PART" in
kernels)
    # 1. Correctness of the TMA kernels on sm90, eager, under Inductor and under CUDA
    #    graphs, before any timing (pinned tilings: no autotuning per example).
    #    (-k tma: each autotuned call compiles every tiling once, so the pointer kernel's
    #    own checks, which a GPU session has half run, are left for a call with time.)
    step 200 "TMA kernel checks" python3 -m pytest -q -x -p no:cacheprovider \
        benchmarks/gpu_checks/test_linear_scatter_cuda.py benchmarks/gpu_checks/test_linear_norm_scatter_cuda.py \
        -k tma --junitxml="$OUT/kernel_checks.xml"
    # 2. Issue 4's table: every variant against cuBLAS + index_copy_ (D 1536 / 3072, k 512..4096).
    step 240 "linear_scatter_ benchmark, all variants" python3 benchmarks/bench_linear_scatter.py --no-compile --no-norm
    # 3. What the device's Triton compiles the kernels to (no GPU time: a CPU compile).
    step 40 "kernel report (the device's Triton)" python3 benchmarks/kernel_report.py --out "$OUT/report"
    # 4. The norm epilogue, never timed yet: one k per width and head dim.
    step 80 "linear_norm_scatter_ benchmark" python3 benchmarks/bench_linear_scatter.py --no-compile --norm-only \
        --dims 3072 --head-dims 128 --ks 2048 --out "$OUT/norm"
    ;;
sd3)
    # Issue 5: SD3-medium's shape at 1024x1024 under CUDA graphs (reduce-overhead), which
    # the committed cuda_sd3_medium.* (default mode, two graphs, an H100) predates.
    step 540 "SD3-medium, reduce-overhead" python3 benchmarks/bench_speed.py --model sd3-medium --device cuda \
        --configs compiled ras_r0.5 ras_r0.125 --repeats 2 --no-caches --compile-mode reduce-overhead \
        --name cuda_sd3_medium_cudagraphs
    ;;
flux)
    step 400 "FLUX.1-dev" python3 benchmarks/bench_speed.py --model flux-dev --device cuda \
        --configs compiled ras_r0.5 ras_r0.125 --repeats 2 --no-caches
    step 150 "PixArt-Sigma" python3 benchmarks/bench_speed.py --model pixart-sigma --device cuda \
        --configs compiled ras_r0.5 --repeats 2 --no-caches
    ;;
stepcache)
    # RAS's step cache (RASPolicy.step_cache_interval) under CUDA graphs: the kept outputs must be
    # copies of what a replay returned; then its speed stacked on RAS and alone at SD3-medium's shape.
    step 120 "step cache under CUDA graphs" python3 -m pytest -q -x -p no:cacheprovider \
        benchmarks/gpu_checks/test_ras_cuda.py -k reduce_overhead --junitxml="$OUT/step_cache_checks.xml"
    step 450 "SD3-medium, step cache" python3 benchmarks/bench_speed.py --model sd3-medium --device cuda \
        --configs compiled ras_r0.5 rassc2_r0.5 rassc2_r1 --repeats 2 --no-caches --no-recheck-baseline \
        --name cuda_sd3_medium_step_cache
    ;;
*)
    echo "session.sh: unknown part '$PART' (kernels, sd3, flux or stepcache)" | tee -a "$LOG"
    exit 2
    ;;
esac

# What this call wrote: the results it (re)made and the checks' logs.
find benchmarks/results "$OUT" -type f -newer "$STARTED" ! -name results.tar.gz ! -name session.log -print0 \
    | tar -czf "$OUT/results.tar.gz" --null -T -
echo "packed $OUT/results.tar.gz:" | tee -a "$LOG"
tar -tzf "$OUT/results.tar.gz" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'session.sh: failed: %s\n' "${FAILED[@]}" | tee -a "$LOG"
    exit 1
fi
