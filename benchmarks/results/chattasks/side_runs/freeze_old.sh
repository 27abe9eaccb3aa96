#!/bin/bash
# Old-task remedy for the increment: the bench's increment again (the 12 experts, --init-from the first
# registration's checkpoint, 75 steps, the workflow's other settings), with the 10 old experts' gate rows frozen
# (freeze_old: only the 2 new experts' rows and the MLP gates, which only new experts target, train); then the
# same per-task evaluation (30 samples, seeded). Run from the repository root after the bench, on its work dir.
set -euo pipefail
W=${W:-/tmp/bench-chattasks}
O=${O:-/tmp/real/freeze_old}
FIRST=$(python -c "import json; print(json.load(open('benchmarks/results/chattasks/results.json'))['first']['outputs']['train']['checkpoint'])")
EXPERTS="[iso_date, larger, list_max, join_commas, fix_sentence, dedupe_words, email_name, word_after, int_commas, kv_json, last_first, snake_label]"
python pipelines/train_gates.py registry="$W/registry" experts="$EXPERTS" init_from="$FIRST" freeze_old=true \
  steps=75 batch=16 num_workers=2 cpus_per_worker=1 precision=bf16 composite_fraction=0.25 \
  name=freeze-old storage_path="$O/runs" output="$O/checkpoint"
python pipelines/evaluate.py --manifest "$W/more.yaml" --checkpoint "$O/checkpoint" --composite "" --samples 30 --out "$O/eval"
