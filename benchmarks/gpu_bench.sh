#!/usr/bin/env bash
# The GPU benchmarks of issue 11 and the GPU cost of experiment 2 (issue 14), in one command for a lent GPU machine
# with no network: target architectures with random weights (conf/model/random_*.yaml; no weights can be
# downloaded), bf16 autocast, one GPU. Prepared on the CPU machine (README "GPU benchmark"):
#   .device/cache/smollm2-135m-instruct/  the tokenizer files of ~/.cache/lbdpo/smollm2-135m-instruct (no weights)
#   .device/data/                         hh_helpful-base_train_sample.jsonl, oasst1_zh_pairs.jsonl from ../shared
#   .whl/                                 wheels missing there (hydra-core, omegaconf, antlr4, datasets, dill,
#                                         multiprocess, trl, vaderSentiment)
# Usage: bash benchmarks/gpu_bench.sh OUT_DIR [DEVICE] [SCALE]   (DEVICE=cpu SCALE=tiny: a dry run of every stage here)
set -u
out=${1:?output folder}; device=${2:-cuda}; scale=${3:-full}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1 && [ "$device" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} LBDPO_CACHE=$PWD/.device/cache LBDPO_SHARED_DATA=$PWD/.device/data
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
hh=.device/data/hh_helpful-base_train_sample.jsonl
if [ "$scale" = tiny ]; then m05=tiny_random; m15=tiny_random; steps="--steps 3 --skip 1"; train_steps=3
else m05=random_qwen2_5_0_5b; m15=random_r1_distill_qwen_1_5b; steps="--steps 20 --skip 5"; train_steps=30; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip list 2>/dev/null | grep -iE "^(pyarrow|datasets|fsspec|huggingface.hub|accelerate) "
  $py -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
} > "$out/env.txt" 2>&1
bench() {  # name, timeout, dpo_speed args...
  local name=$1 limit=$2; shift 2
  echo "== $name $(date +%T)"
  timeout "$limit" $py benchmarks/dpo_speed.py --device "$device" --data "$hh" $steps "$@" > "$out/$name.md" 2> "$out/$name.err"
  echo "rc=$? $(date +%T)"; cat "$out/$name.md"
}
# 1. the issue's configuration (8 pairs, 256 tokens) on Qwen2.5-0.5B's architecture
bench qwen05b_8x256 240 --model $m05 --arms trl,fixed,linear,mlp,trl_precompute,fixed_precompute,rows
# 2. the experiment's lengths on DeepSeek-R1-Distill-Qwen-1.5B's architecture
bench r1d15b_8x384 150 --model $m15 --arms trl,fixed --max-length 384 --max-prompt-length 256
# 3. experiment 2's command path (train.py, HH + OASST zh, 2 × 8 pairs a step, the design's head, eval at the end)
echo "== train $(date +%T)"
timeout 120 $py train.py model=$m05 trainer=gpu "trainer.cpu=$([ "$device" = cpu ] && echo true || echo false)" \
  data=mix_hh_zh logger=none beta_head=linear trainer.batch_size=8 trainer.gradient_accumulation_steps=2 \
  trainer.policy_lr=1.0e-6 trainer.max_steps=$train_steps trainer.log_every=1 trainer.eval_every=0 trainer.save_every=0 \
  data.max_eval_pairs=64 hydra.run.dir="$out/train_run" > "$out/train.log" 2>&1
echo "rc=$? $(date +%T)"; tail -5 "$out/train.log"
cp "$out/train_run/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null; rm -rf "$out/train_run"
