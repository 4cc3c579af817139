#!/usr/bin/env bash
# The GPU benchmarks (issues 11, 14, 39), in one command for a lent GPU machine with no network: target architectures
# with random weights (conf/model/random_*.yaml; no weights can be downloaded), bf16 autocast, one GPU.
# The default stage, `table` (issue 39), is ONE call of at most 8 minutes that prints ONE table: TRL 1.16 against
# lbdpo's GPU default (rows) and each packed layout (block mask, bucketed; attention per segment; FlexAttention,
# trainer.packed_attention=flex: its first steps compile flex_attention and are skipped) at 8 pairs × 256
# tokens and at the realistic shapes (Qwen2.5-0.5B 16 pairs × 1024, R1-Distill-Qwen-1.5B 8 pairs × 1024, with
# checkpointing): median s/step and spread, pairs/s, real tokens/s, peak GPU memory, speed vs TRL
# (benchmarks/gpu_table.py: one process, models built once per shape; a 380 s budget for starting arms).
# Dry run on the CPU (every code path, tiny models, 2 pairs × 64):  bash benchmarks/gpu_bench.sh /tmp/out cpu tiny
#   (the table stage's dry run is tests/test_gpu_bench.py, ≈ 1 minute; on the CPU flex runs torch's unfused reference)
# Prepare on the CPU machine (after `make setup`, with ../shared beside the repo):
#   bash benchmarks/gpu_bench.sh --prepare   fills the two ignored folders a device call carries:
#     .device/cache/smollm2-135m-instruct/   the tokenizer files of the converted SmolLM2 (no weights)
#     .device/data/                          hh_helpful-base_train_sample.jsonl, oasst1_zh_pairs.jsonl from ../shared
#     .whl/                                  wheels the GPU image lacks (hydra-core, omegaconf, antlr4, datasets,
#                                            dill, multiprocess, trl, vaderSentiment), for its Python 3.12
# then on the GPU machine (device tool: carry .whl and .device):  bash benchmarks/gpu_bench.sh $OUT
# Usage: bash benchmarks/gpu_bench.sh OUT_DIR [DEVICE] [SCALE] [STAGES]   (DEVICE=cpu SCALE=tiny: a dry run here)
#   STAGES: any of table,speed,profile,train,r1d,compile,arms (default: table). Each stage has its own time limit
#   (470, 330, 120, 120, 200, 300, ARMS_LIMIT s): pick stages that fit a 10-minute device call. `compile` times the packed
#   step against the padded rows (trainer.forward=rows) and torch.compile (trainer.compile=true), next to TRL. On the 2026-11-29 H200 each arm took ~70 s of
#   start-up before its first step (imports, two random models built on the host; not broken down).
set -u
if [ "${1:-}" = --prepare ]; then
  set -e
  src=${LBDPO_CACHE:-$HOME/.cache/lbdpo}/smollm2-135m-instruct; shared=../shared/data/preference
  mkdir -p .device/cache/smollm2-135m-instruct .device/data .whl
  cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .device/cache/smollm2-135m-instruct/
  cp "$shared"/{hh_helpful-base_train_sample.jsonl,oasst1_zh_pairs.jsonl} .device/data/
  .venv/bin/pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3        # sdist only on PyPI
  v() { .venv/bin/pip show "$1" | awk '/^Version/{print $2}'; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    hydra-core==$(v hydra-core) omegaconf==$(v omegaconf) datasets==$(v datasets) dill==$(v dill) \
    multiprocess==$(v multiprocess) trl==1.16.0 vaderSentiment==$(v vaderSentiment)
  du -sh .device .whl; exit 0
fi
out=${1:?output folder}; device=${2:-cuda}; scale=${3:-full}; stages=${4:-table}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1 && [ "$device" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# the prepared folders where they are (the GPU machine); else (a CPU dry run) the usual cache and ../shared
[ -d .device/cache ] && export LBDPO_CACHE=$PWD/.device/cache
[ -d .device/data ] && export LBDPO_SHARED_DATA=$PWD/.device/data
py=${PYTHON:-python3}
hh=${LBDPO_SHARED_DATA:-../shared/data/preference}/hh_helpful-base_train_sample.jsonl
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
on() { [[ ",$stages," == *",$1,"* ]]; }
# 0. issue 39's one table (tiny: every shape as tiny_random, 2 pairs × 64 tokens, 2 steps: the CPU dry run)
if on table; then
  echo "== table $(date +%T)"
  if [ "$scale" = tiny ]; then table_args="--scale tiny --steps 2 --skip 0"; else table_args="--budget-s ${TABLE_BUDGET:-380}"; fi
  # TABLE_ARMS (comma-separated, default every arm with trl first): e.g. without trl installed, lbdpo's arms only
  timeout 470 $py benchmarks/gpu_table.py --device "$device" --data "$hh" $table_args ${TABLE_ARMS:+--arms "$TABLE_ARMS"} \
    > "$out/table.md" 2> "$out/table.err"
  echo "rc=$? $(date +%T)"; cat "$out/table.md"
fi
# 1. the issue's configuration (8 pairs, 256 tokens) on Qwen2.5-0.5B's architecture
on speed && bench qwen05b_8x256 330 --model $m05 --arms trl,fixed,linear,mlp,trl_precompute,fixed_precompute
# 2. where the packed step's time goes on the device: host vs CUDA time per operator
if on profile; then
  echo "== profile $(date +%T)"
  timeout 120 $py benchmarks/profile_step.py --device "$device" --model $m05 --data "$hh" --steps 5 --top 20 \
    > "$out/profile.md" 2>&1; echo "rc=$? $(date +%T)"
fi
# 3. experiment 2's command path (train.py, HH + OASST zh, 2 × 8 pairs a step, the design's head, eval at the end)
if on train; then
  echo "== train $(date +%T)"
  timeout 120 $py train.py model=$m05 trainer=gpu "trainer.cpu=$([ "$device" = cpu ] && echo true || echo false)" \
    data=mix_hh_zh logger=none beta_head=linear trainer.batch_size=8 trainer.gradient_accumulation_steps=2 \
    trainer.policy_lr=1.0e-6 trainer.max_steps=$train_steps trainer.log_every=1 trainer.eval_every=0 trainer.save_every=0 \
    data.max_eval_pairs=64 hydra.run.dir="$out/train_run" > "$out/train.log" 2>&1
  echo "rc=$? $(date +%T)"; tail -3 "$out/train.log"
  cp "$out/train_run/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null; rm -rf "$out/train_run"
fi
# 4. the experiment's lengths on DeepSeek-R1-Distill-Qwen-1.5B's architecture
on r1d && bench r1d15b_8x384 200 --model $m15 --arms trl,fixed --max-length 384 --max-prompt-length 256
# 5. whether the packed forward or eager kernels are what is slow on the device: padded rows, compiled decoder
on compile && bench qwen05b_compile 300 --model $m05 --arms trl,fixed,rows,fixed_compile
# 6. any arms of dpo_speed.py on Qwen2.5-0.5B's architecture: ARMS (comma-separated) within ARMS_LIMIT seconds; each
#    arm's result reaches $out/qwen05b_arms.err as it finishes, so a cut call keeps the arms that ran
on arms && bench qwen05b_arms "${ARMS_LIMIT:-420}" --model $m05 --arms "${ARMS:-trl,fixed,fixed_pad64,fixed_no_cudnn_sdp}"
exit 0  # each stage printed its own rc= line; a stage left out is not a failure
