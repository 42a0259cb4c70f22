#!/usr/bin/env bash
# H100 train-step variants of docs/measurements (needs the .whl wheels of grain/ml_collections carried and $OUT).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
f() { echo "### $*" | tee -a $OUT/log; timeout 150 "$@" 2>&1 | grep -v -E "^W[0-9]{4}" | tail -4 | tee -a $OUT/log; }
f python3 bench/train_step.py --preset qwen1.8b-so400m --stage pretrain --batch 8 --attention cudnn --steps 5
f python3 bench/train_step.py --preset qwen1.8b-so400m --stage finetune --batch 4 --attention cudnn --steps 5
f python3 bench/train_step.py --preset qwen1.8b-so400m --stage finetune --batch 4 --attention cudnn --remat dots --steps 5
f python3 bench/train_step.py --preset qwen1.8b-so400m --stage finetune --batch 16 --attention cudnn --steps 5
