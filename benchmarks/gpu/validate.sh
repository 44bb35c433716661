#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200, in at most ~8 minutes, writing one report file.
#
#   bash benchmarks/gpu/validate.sh [REPORT]     (default: $OUT/gpu-report.txt, else ./gpu-report.txt)
#
# 1. every `gpu`-marked test (CUDA kernels, CUDA graphs, HF parity on CUDA)      ~2 min budget
# 2. dense bf16 training of a ~1.1B Llama-shaped model with mcore train: MFU     ~2 min budget
#    (compiled layers, train.compile auto = on on CUDA, and eager, side by side)
# 3. the inference benchmark with CUDA graphs against transformers' generate    ~2 min budget
# 4. the MoE layer benchmark against transformers' grouped_mm experts            ~1 min budget
#
# Each part has its own time limit; a part that fails or runs out of time is recorded as such
# and the next one still runs. Nothing is downloaded: models are built from configs.
#
# Python: $PY if set; else `uv run --locked python` where uv is installed; else python3 (a GPU
# image with torch, transformers and pytest, but no network). For the last, build our wheels
# (and any missing third party, e.g. pyzmq) on a connected machine and bring them as .whl/:
#   uv build --all-packages --wheel --out-dir .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl pyzmq
# The script installs .whl/*.whl into /tmp/site (entry points included) when mcore is missing.
set -uo pipefail

cd "$(dirname "$0")/../.."
REPORT="${1:-${OUT:-.}/gpu-report.txt}"
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"

if [ -z "${PY:-}" ]; then
    if command -v uv >/dev/null; then PY="uv run --locked python"; else PY=python3; fi
fi
if ! $PY -c "import mcore.core" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
MCORE=($PY -m mcore.core.cli)

section() { printf '\n===== %s =====\n' "$1" | tee -a "$REPORT"; }
run() {  # run LIMIT_S CMD...: the command's output into the report, its status after it
    local limit=$1
    shift
    local started=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$REPORT" | tail -n 40
    local status=${PIPESTATUS[0]}
    printf -- '--> exit %s after %ss (limit %ss)\n' "$status" "$((SECONDS - started))" "$limit" \
        | tee -a "$REPORT"
}

section "machine"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee -a "$REPORT"

section "1. gpu-marked tests"
run 150 $PY -m pytest -q -m gpu -p no:cacheprovider --durations=10

# ~1.1B parameters: 16 layers of hidden 2048 (16 heads, 8 KV groups, SwiGLU 5632), seq 2048.
TRAIN_ARGS=(
    --nproc 1 --train.bf16 true --train.train-iters 30 --train.micro-batch-size 4
    --train.seq-length 2048 --model.num-layers 16 --model.hidden-size 2048
    --model.num-attention-heads 16 --model.num-query-groups 8 --model.ffn-hidden-size 5632
    --model.vocab-size 32768 --data.max-bytes 20000000 --logger.log-interval 10
)
section "2a. dense bf16 training, ~1.1B, train.compile on (auto on CUDA)"
run 150 "${MCORE[@]}" train "${TRAIN_ARGS[@]}" --train.compile on
section "2b. the same, eager (train.compile off)"
run 90 "${MCORE[@]}" train "${TRAIN_ARGS[@]}" --train.compile off

section "3. inference with CUDA graphs vs transformers generate"
run 120 $PY benchmarks/inference_vs_transformers.py --device cuda \
    --requests 64 --layers 8 --hidden 1024 --heads 16 --repeat 2

section "4. MoE layer vs transformers grouped_mm"
run 60 $PY benchmarks/moe_vs_transformers.py --device cuda --dtype bf16

section "done"
echo "report: $REPORT" | tee -a "$REPORT"
