#!/usr/bin/env bash
# The RLVR demo: GRPO on SmolLM2-135M-Instruct with verifiable rewards on a generated arithmetic task, held-out
# accuracy before and after (scripts/demo.sh runs it: see there).
exec bash "$(dirname "$0")/demo.sh" rlvr
