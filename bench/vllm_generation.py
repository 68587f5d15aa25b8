"""Generation alone: our HF decoding loop vs the vLLM engine (``ppo.generation.backend=vllm``), same policy.

    PYTHONPATH=. flock /tmp/rlhf-heavy.lock python bench/vllm_generation.py --threads 1                  # eager
    PYTHONPATH=. flock /tmp/rlhf-heavy.lock python bench/vllm_generation.py --threads 1 --compiled       # compiled
    PYTHONPATH=. flock /tmp/rlhf-heavy.lock python bench/vllm_generation.py --threads 1 --block-size 128 # vLLM's

SmolLM2-135M-Instruct, fp32: the 8 hh-rlhf prompts of ``ppo_iteration.py`` (left-padded to 64 tokens) × 32
sampled tokens (temperature 1; the stop token is the vocabulary's last id, so every call samples all 32
columns, checked; vLLM returns the sampled tokens' log-probabilities, as in training). The engine is built
first (its start-up is printed); then one warm-up call per side and ``--rounds`` rounds of one call per side,
alternating (vLLM, HF loop); each side's median call. ``--block-size``: ``ppo.generation.vllm.block_size``
(default: the schema's). ``--prompts N``: the first N prompts only, or each of the 8 repeated (an extra row,
not the workload of the targets).
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
    p.add_argument("--block-size", type=int, default=None, help="the engine's KV-cache block (default: schema's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=None, help="batch size (default: the 8 prompts)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import benchlib
    from ppo_iteration import PROMPTS, RESPONSE_TOKENS, hh_prompts

    from rlhf_lightning.config.schema import GenerationConfig, VLLMConfig
    from rlhf_lightning.models import load_policy, load_tokenizer
    from rlhf_lightning.rollout.sampler import generate
    from rlhf_lightning.rollout.vllm_engine import VLLMEngine

    name, gguf = benchlib.model_source("smollm2")
    tokenizer, policy = load_tokenizer(name, gguf), load_policy(name, gguf)
    prompts = hh_prompts(tokenizer)
    batch = args.prompts or PROMPTS
    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    width = max(map(len, prompts))
    ids = torch.full((batch, width), tokenizer.pad_token_id)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, p_ in enumerate(prompts):
        ids[i, width - len(p_):], mask[i, width - len(p_):] = torch.tensor(p_), 1
    gen = GenerationConfig(max_new_tokens=RESPONSE_TOKENS)
    settings = {"enforce_eager": not args.compiled}
    if args.block_size is not None:
        settings["block_size"] = args.block_size
    config = VLLMConfig(**settings)
    start = time.perf_counter()
    engine = VLLMEngine(policy, tokenizer, config, gen, max_model_len=128)
    start_s = time.perf_counter() - start
    print(f"engine start {start_s:.1f} s (compiled={args.compiled}, block_size={config.block_size}, "
          f"threads={args.threads}, {batch} prompts)")
    stop = len(tokenizer) - 1
    engines = {"vllm": engine, "hf": None}

    def call(side: str) -> float:
        t = time.perf_counter()
        ro = generate(policy, ids, mask, gen, stop, tokenizer.pad_token_id, engine=engines[side])
        assert ro.response_mask.shape[1] == RESPONSE_TOKENS and bool(ro.response_mask.all())
        return time.perf_counter() - t

    for side in engines:  # warm-up
        call(side)
    times = {side: [] for side in engines}
    for _ in range(args.rounds):
        for side in engines:
            times[side].append(call(side))
    rates = {side: batch * RESPONSE_TOKENS / sorted(t)[len(t) // 2] for side, t in times.items()}
    for side, rate in rates.items():
        print(f"{side}: {rate:.1f} tokens/s (median of {args.rounds} alternating calls after 1 warm-up)")
    print(f"vLLM / HF loop: {rates['vllm'] / rates['hf']:.2f}x")
    if args.out:
        result = {"benchmark": "vllm_generation", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                  "versions": benchlib.versions(), "threads": args.threads, "compiled": args.compiled,
                  "block_size": config.block_size, "prompts": batch, "response_tokens": RESPONSE_TOKENS,
                  "prompt_lengths": [len(p_) for p_ in prompts], "engine_start_s": start_s,
                  "calls_s": times, "tokens_per_s": rates, "vllm_over_hf": rates["vllm"] / rates["hf"]}
        benchlib.write_result(args.out, result)


if __name__ == "__main__":
    main()
