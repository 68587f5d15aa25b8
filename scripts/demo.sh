#!/usr/bin/env bash
# The demos: set up, train, and print a summary (wall times below exclude the setup).
#   bash scripts/demo.sh          # RLHF: a proxy and a judge reward model on disjoint halves of the HH-RLHF harmless
#                                 # pairs, then PPO with the proxy on SmolLM2-135M-Instruct, judged on 128 held-out
#                                 # prompts by both; outputs/demo
#   bash scripts/demo.sh rlvr     # RLVR: GRPO with verifiable rewards (no reward model, no critic) on a generated
#                                 # arithmetic task, held-out accuracy before/after; outputs/demo_rlvr
# (scripts/demo_rlvr.sh is the second.) Outputs are replaced on each run; RUN=<dir> moves them.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-rlhf}
case "$DEMO" in rlhf) RUN=${RUN:-outputs/demo} ;; rlvr) RUN=${RUN:-outputs/demo_rlvr} ;;
  *) echo "error: unknown demo '$DEMO' (expected rlhf or rlvr)" >&2; exit 2 ;; esac
bash scripts/setup.sh
PY=.venv/bin/python
rm -rf "$RUN"
start=$(date +%s)
if [ "$DEMO" = rlhf ]; then
  # the proxy (PPO optimizes it) and the judge (PPO never trains on it) on disjoint halves of the pairs
  "$PY" train.py stage=reward experiment=demo_reward_proxy hydra.run.dir="$RUN/reward"
  "$PY" train.py stage=reward experiment=demo_reward_judge hydra.run.dir="$RUN/judge"
  # the proxy's diagnostics on the 200 held-out pairs, its gain over "the shorter response wins": $RUN/reward/rm_eval.*
  "$PY" -m rlhf_lightning.rm_eval "$RUN/reward/model" ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz --heldout
  "$PY" train.py stage=ppo experiment=demo_ppo reward_model_path="$RUN/reward/model" \
    "eval.judges=[{name: judge, path: $RUN/judge/model}]" hydra.run.dir="$RUN/ppo"
  "$PY" -m rlhf_lightning.summary "$RUN/reward" "$RUN/ppo" --json "$RUN/summary.json" --figure "$RUN/overoptimization.png"
else
  "$PY" -m rlhf_lightning.data.rlvr --task add_mix --out outputs/rlvr_add_mix --train 131 --heldout 40 --seed 0
  "$PY" train.py stage=ppo experiment=demo_rlvr hydra.run.dir="$RUN/grpo"
  "$PY" -m rlhf_lightning.summary "$RUN/grpo" --json "$RUN/summary.json"
fi
echo "demo ($DEMO) wall time: $(( $(date +%s) - start )) s (setup excluded); outputs in $RUN"
