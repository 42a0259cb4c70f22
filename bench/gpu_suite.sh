#!/usr/bin/env bash
# The accelerator figures of the README, in one go (about 8 minutes on one H100/H200): ./bench/gpu_suite.sh [OUT_DIR]
# Expects jax with CUDA, flax, optax, orbax; run from the repository root. Each command is capped at
# 150 s so that one slow compile cannot eat the budget; tests/test_bench.py checks every command's arguments.
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
run() { echo "### $*" | tee -a "$out/log"; timeout 150 "$@" 2>&1 | grep -v -E "^W[0-9]{4}|libtpu" | tee -a "$out/log"; }
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run python3 -c "import jax, flax, optax, orbax.checkpoint as o; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
run python3 bench/attention_check.py
run python3 bench/train_step.py --preset qwen1.8b-so400m --stage finetune --batch 8 --attention cudnn --remat attention --steps 5
run python3 bench/train_step.py --preset qwen1.8b-so400m --stage finetune --batch 8 --attention cudnn --remat full --steps 5
run python3 bench/train_step.py --preset qwen1.8b-so400m --stage finetune --batch 8 --attention xla --remat attention --steps 5
run python3 bench/train_step.py --preset qwen1.8b-so400m --stage pretrain --batch 8 --attention cudnn --remat attention --steps 5
run python3 bench/router_memory.py
run python3 bench/decode.py --no-transformers
run python3 bench/learner_cache.py --tokens 4096 --step-layers 4 --dtype bfloat16 --rounds 3
