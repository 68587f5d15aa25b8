"""Generation alone: our HF decoding loop vs the vLLM engine (``ppo.generation.backend=vllm``), same policy.

    PYTHONPATH=. flock /tmp/rlhf-heavy.lock python bench/vllm_generation.py --threads 1            # eager engine
    PYTHONPATH=. flock /tmp/rlhf-heavy.lock python bench/vllm_generation.py --threads 1 --compiled # torch.compile

SmolLM2-135M-Instruct, fp32: the 8 hh-rlhf prompts of ``ppo_iteration.py`` (left-padded to 64 tokens) × 32
sampled tokens (temperature 1; the stop token is the vocabulary's last id, so every call samples all 32
columns, checked). Each side: 1 warm-up call, then the median of 3 calls, alternating nothing (one side after
the other, the engine built first; its start-up is printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compiled", action="store_true", help="enforce_eager=False (vLLM compiles the model)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import benchlib
    from ppo_iteration import PROMPTS, RESPONSE_TOKENS, hh_prompts

    from rlhf_lightning.models import load_policy, load_tokenizer
    from rlhf_lightning.rollout import generate
    from rlhf_lightning.schema import GenerationConfig, VLLMConfig
    from rlhf_lightning.vllm_engine import VLLMEngine

    name, gguf = benchlib.model_source("smollm2")
    tokenizer, policy = load_tokenizer(name, gguf), load_policy(name, gguf)
    prompts = hh_prompts(tokenizer)
    width = max(map(len, prompts))
    ids = torch.full((PROMPTS, width), tokenizer.pad_token_id)
    mask = torch.zeros(PROMPTS, width, dtype=torch.long)
    for i, p_ in enumerate(prompts):
        ids[i, width - len(p_):], mask[i, width - len(p_):] = torch.tensor(p_), 1
    gen = GenerationConfig(max_new_tokens=RESPONSE_TOKENS)
    start = time.perf_counter()
    engine = VLLMEngine(policy, tokenizer, VLLMConfig(enforce_eager=not args.compiled), gen, max_model_len=128)
    print(f"engine start {time.perf_counter() - start:.1f} s (compiled={args.compiled}, threads={args.threads})")
    stop = len(tokenizer) - 1
    for side, eng in (("vllm", engine), ("hf", None)):
        times = []
        for _ in range(4):
            t = time.perf_counter()
            ro = generate(policy, ids, mask, gen, stop, tokenizer.pad_token_id, engine=eng)
            times.append(time.perf_counter() - t)
            assert ro.response_mask.shape[1] == RESPONSE_TOKENS
        median = sorted(times[1:])[1]
        print(f"{side}: {PROMPTS * RESPONSE_TOKENS / median:.1f} tokens/s (median of 3 calls after 1 warm-up)")


if __name__ == "__main__":
    main()
