#!/usr/bin/env bash
# The issue-16 evaluation: the Quickstart adapter against its base SmolLM2-135M-Instruct on
# the 252 self-instruct user-oriented prompts, judged by SmolLM2-135M-Instruct itself.
# BENCHMARKS.md records the run (answers via generate.py, same engine); this script reruns it end to end.
# Usage: bench/evaluate_quickstart.sh ADAPTER_DIR WORK_DIR [JUDGE_API_BASE]
#   ADAPTER_DIR: the README Quickstart fine-tune (python finetune.py --data data/quickstart.json ...)
#   JUDGE_API_BASE: an OpenAI-compatible endpoint serving SmolLM2 (python generate.py --api);
#                   without it the judge is the same model loaded locally (label probabilities).
set -euo pipefail
ADAPTER=$1 WORK=$2 API=${3:-}
SET=${EVAL_SET:-$(dirname "$0")/../../shared/data/self_instruct/user_oriented_instructions.jsonl}
TOKENS=${MAX_NEW_TOKENS:-128}
mkdir -p "$WORK"
cd "$(dirname "$0")/.."
[ -f "$WORK/adapter.json" ] || python evaluate.py answers --eval_set "$SET" --lora_weights "$ADAPTER" \
  --generator quickstart-adapter --max_new_tokens "$TOKENS" --batch_size 16 --output_file "$WORK/adapter.json" &
[ -f "$WORK/base.json" ] || python evaluate.py answers --eval_set "$SET" \
  --generator smollm2-base --max_new_tokens "$TOKENS" --batch_size 16 --output_file "$WORK/base.json" &
wait
if [ -n "$API" ]; then
  JUDGE=(--api_base "$API" --judge_model SmolLM2-135M-Instruct)
else
  JUDGE=(--judge_base_model "$(python -c 'from lora_alpaca.default_model import default_model_path; print(default_model_path())')")
fi
/usr/bin/time -v python evaluate.py judge --model_outputs "$WORK/adapter.json" --reference_outputs "$WORK/base.json" \
  --output_dir "$WORK/judge" "${JUDGE[@]}" 2> >(grep -E "Elapsed|Maximum resident" >&2)
