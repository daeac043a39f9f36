#!/usr/bin/env bash
# The traffic loop on a real shift (issue 24's measurement), by hand on this CPU:
#   1. the shipped head serves GSM8K questions after the bench's first 80 through
#      `eagle3 serve --record` (vLLM, 4 in flight), so the traffic lands in S3 as records;
#   2. a data stage on that traffic (recorded greedy answers reused, the head's vocabulary kept),
#      the newest traffic.held_out_fraction held out;
#   3. the shipped head fine-tuned on the rest (train.init_from), a short schedule;
#   4. vLLM benches of the shipped and the adapted head on the held-out (never trained on) slice,
#      then on the general set (MT-bench, first 10), then our engine (tree only) on the held-out.
# The flows (monitor, adapt) do the same on a schedule; this script times the pieces.
#
#   benchmarks/traffic_shift.sh                       # N=240 questions, 84 steps, 20 held-out prompts
#   N=40 STEPS=4 HELD=4 benchmarks/traffic_shift.sh   # smoke
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-240}
STEPS=${STEPS:-84}
HELD=${HELD:-20}
GENERAL=${GENERAL:-10}
ENGINE_HELD=${ENGINE_HELD:-10}
PORT=${PORT:-8011}
RUN=${RUN:-runs/shift-gsm8k}
C=configs/smollm2-135m.yaml
HEAD=smollm2-135m-instruct
E3=.venv/bin/eagle3
export EAGLE3_VLLM_VENV=${EAGLE3_VLLM_VENV:-$PWD/.venv-vllm}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p "$RUN"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

log "stack up"
$E3 stack up
set -a; . .eagle3/stack/stack.env; set +a

if [ ! -f "$RUN/traffic.done" ]; then
  log "serving $HEAD with --record on 127.0.0.1:$PORT"
  $E3 serve --config $C --profile full --draft $HEAD --record --port "$PORT" \
    vllm.speculative_tokens=3 > "$RUN/serve.log" 2>&1 &
  SERVE=$!
  trap 'kill -TERM $SERVE 2>/dev/null || true' EXIT
  for _ in $(seq 300); do
    curl -sf "127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 $SERVE 2>/dev/null || { tail -30 "$RUN/serve.log"; exit 1; }
    sleep 1
  done
  log "sending GSM8K questions 81..$((80 + N)), 4 in flight"
  .venv/bin/python - "$PORT" "$N" <<'EOF'
import sys, time
from concurrent.futures import ThreadPoolExecutor
import httpx
from eagle3.config import load_recipe
from eagle3.data.sources import load_eval_prompts
port, n = int(sys.argv[1]), int(sys.argv[2])
recipe = load_recipe("configs/smollm2-135m.yaml", [], "full")
qs = [p.turns[0] for p in load_eval_prompts("gsm8k", 80 + n, recipe)[80:]]
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
model = c.get("/v1/models").json()["data"][0]["id"]
t0, done = time.perf_counter(), [0]
def ask(q):
    r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 256, "temperature": 0,
               "messages": [{"role": "user", "content": q}]})
    r.raise_for_status()
    done[0] += 1
    if done[0] % 20 == 0:
        print(f"{done[0]}/{len(qs)} in {time.perf_counter() - t0:.0f} s", flush=True)
    return r.json()["usage"]["completion_tokens"]
with ThreadPoolExecutor(4) as pool:
    toks = sum(pool.map(ask, qs))
dt = time.perf_counter() - t0
print(f"served {len(qs)} questions, {toks} tokens in {dt:.0f} s ({toks / dt:.1f} tok/s, 4 in flight)")
EOF
  log "stopping the server: the recorder spools and uploads what is left"
  kill -TERM $SERVE; wait $SERVE || true  # not INT: a background job of a script ignores SIGINT
  trap - EXIT
  tail -3 "$RUN/serve.log"
  touch "$RUN/traffic.done"
fi

HELD_FRACTION=$(.venv/bin/python -c "print(round($HELD / $N + 0.0001, 4))")
COMMON=(--config $C --profile full "run_dir=$RUN" "data.sources=[{name: traffic}]" "data.mix=[]"
        "data.vocab_from=heads/$HEAD" "traffic.held_out_fraction=$HELD_FRACTION")
log "data stage on the traffic (held out: $HELD_FRACTION)"
$E3 data "${COMMON[@]}"

log "training from the shipped head, $STEPS steps"
$E3 train "${COMMON[@]}" "train.init_from=heads/$HEAD" "train.max_steps=$STEPS" "train.epochs=8" \
  "train.lr=3.0e-4" "train.eval_every=$((STEPS / 4 > 0 ? STEPS / 4 : 1))" "train.save_every=0"

log "held-out prompts"
.venv/bin/python - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
man = json.loads((run / "data" / "manifest.json").read_text())
val = set(man["split"]["val_ids"])
from eagle3.config import load_recipe, SourceSpec
from eagle3.traffic.adapt import held_out_prompts
from eagle3.traffic.source import load_traffic
recipe = load_recipe("configs/smollm2-135m.yaml", [f"run_dir={run}"], "full")
t = load_traffic(recipe, SourceSpec(name="traffic"))
rows = held_out_prompts(t.records, val)
with open(run / "held_out.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(f"{len(rows)} held-out prompts (newest), none trained on")
EOF

for who in shipped adapted; do
  draft=$([ $who = shipped ] && echo $HEAD || echo "$RUN/draft")
  [ -f "$RUN/bench-vllm-$who.json" ] && continue
  log "vLLM bench, $who head, $HELD held-out prompts"
  $E3 bench --config $C --profile full --engine vllm --draft "$draft" --datasets heldout \
    --limit "$HELD" --out "$RUN/bench-vllm-$who.json" \
    "data.catalog={heldout: {path: $RUN/held_out.jsonl}}" "eval.vllm_ngram=false" \
    "vllm.speculative_tokens=3" "vllm.concurrency=[1]"
done
# The general set: the adapted head may lose no more than 5% of the shipped head's acceptance.
for who in shipped adapted; do
  draft=$([ $who = shipped ] && echo $HEAD || echo "$RUN/draft")
  [ -f "$RUN/bench-vllm-general-$who.json" ] && continue
  log "vLLM bench, $who head, general set (MT-bench, first $GENERAL)"
  $E3 bench --config $C --profile full --engine vllm --draft "$draft" --datasets mt_bench \
    --limit "$GENERAL" --out "$RUN/bench-vllm-general-$who.json" "eval.vllm_ngram=false" \
    "vllm.speculative_tokens=3" "vllm.concurrency=[1]"
done

# Our engine on the held-out slice: the head alone (tree only) against HF generate.
for who in shipped adapted; do
  draft=$([ $who = shipped ] && echo $HEAD || echo "$RUN/draft")
  [ -f "$RUN/bench-ours-$who.json" ] && continue
  log "our engine, $who head, $ENGINE_HELD held-out prompts"
  $E3 bench --config $C --profile full --engine eagle3 --draft "$draft" --datasets heldout \
    --limit "$ENGINE_HELD" --out "$RUN/bench-ours-$who.json" \
    "data.catalog={heldout: {path: $RUN/held_out.jsonl}}" "eval.tree_only=true" \
    "eval.baselines=[hf_generate]"
done
log "done: $RUN/bench-{vllm,vllm-general,ours}-{shipped,adapted}.json"
