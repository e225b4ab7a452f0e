#!/usr/bin/env bash
# The issue-16 evaluation: the Quickstart adapter against its base SmolLM2-135M-Instruct on
# the 252 self-instruct user-oriented prompts, judged by SmolLM2-135M-Instruct itself, every
# system behind `generate.py --api` (the OpenAI-compatible server) as a user would run it:
#   1. one server holds the base and the adapter (model ids `base` and the adapter folder's
#      name); `evaluate.py answers --api_base` asks each in turn, --concurrency requests at
#      once so the server decodes them in batches;
#   2. that server stops and a second `generate.py --api` serves plain SmolLM2 (no adapter:
#      the tokenizer's own chat template, as a judge should see it); `evaluate.py judge
#      --api_base` reads the preference from its top_logprobs.
# Usage: bench/evaluate_quickstart.sh ADAPTER_DIR WORK_DIR
#   ADAPTER_DIR: the README Quickstart fine-tune (python finetune.py --data data/quickstart.json ...)
# Env: EVAL_SET (default the 252 prompts), MAX_NEW_TOKENS (128), CONCURRENCY (16), LIMIT (0 = all).
# Files already in WORK_DIR are kept (answers) or reused (the judge cache): a rerun resumes.
set -euo pipefail
ADAPTER=$(realpath "$1") WORK=$2
SET=${EVAL_SET:-$(dirname "$0")/../../shared/data/self_instruct/user_oriented_instructions.jsonl}
SET=$(realpath "$SET")
TOKENS=${MAX_NEW_TOKENS:-128} CONC=${CONCURRENCY:-16} LIMIT=${LIMIT:-0}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
cd "$(dirname "$0")/.."
ADAPTER_ID=$(basename "$ADAPTER")
SERVER_PID=

serve() {  # serve ARGS...: start generate.py --api on a free loopback port, wait for /health
  PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python generate.py --api --server_port "$PORT" --api_max_batch "$CONC" --api_queue_size $((CONC * 4)) \
    --api_timeout_s 3600 "$@" > "$WORK/server-$PORT.log" 2>&1 &
  SERVER_PID=$!
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    kill -0 "$SERVER_PID" 2> /dev/null || { cat "$WORK/server-$PORT.log" >&2; exit 1; }
    sleep 2
  done
  API=http://127.0.0.1:$PORT/v1
}
stop() { [ -z "$SERVER_PID" ] || { kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=; }; }
trap stop EXIT

if [ ! -f "$WORK/adapter.json" ] || [ ! -f "$WORK/base.json" ]; then
  serve --lora_weights "$ADAPTER"
  for pair in "$ADAPTER_ID:adapter" "base:base"; do
    model=${pair%%:*} file=$WORK/${pair##*:}.json
    [ -f "$file" ] || /usr/bin/time -f "answers $model: %e s wall" python evaluate.py answers \
      --eval_set "$SET" --limit "$LIMIT" --api_base "$API" --api_model "$model" \
      --generator "smollm2-$model" --max_new_tokens "$TOKENS" --concurrency "$CONC" --output_file "$file"
  done
  stop
fi
serve  # plain SmolLM2-135M-Instruct as the judge
/usr/bin/time -f "judge: %e s wall" python evaluate.py judge --model_outputs "$WORK/adapter.json" \
  --reference_outputs "$WORK/base.json" --output_dir "$WORK/judge" --limit "$LIMIT" \
  --api_base "$API" --judge_model base
