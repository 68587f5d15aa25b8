#!/usr/bin/env bash
# The demo: set up, train a reward model on HH-RLHF harmless pairs, run PPO with it on
# SmolLM2-135M-Instruct, and print a summary. About 18 minutes on 2 CPU cores (setup excluded).
#   bash scripts/demo.sh            # outputs in outputs/demo (replaced on each run)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-outputs/demo}
PY=.venv/bin/python
rm -rf "$RUN"
start=$(date +%s)
"$PY" train.py stage=reward experiment=demo_reward hydra.run.dir="$RUN/reward"
"$PY" train.py stage=ppo experiment=demo_ppo reward_model_path="$RUN/reward/model" hydra.run.dir="$RUN/ppo"
"$PY" -m rlhf_lightning.summary "$RUN/reward" "$RUN/ppo" --json "$RUN/summary.json"
echo "demo wall time: $(( $(date +%s) - start )) s (setup excluded); outputs in $RUN"
