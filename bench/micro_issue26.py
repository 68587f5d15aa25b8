"""Measured savings for issue 26's proposals, on one real GRPO batch of SmolLM2 (ours only, no framework loop).

    # from the repository root, one torch thread
    PYTHONPATH=. python bench/micro_issue26.py --model smollm2 --repeats 3 --out bench/results/micro_issue26.json

The batch: the RLVR demo's 8 prompts (``bench/grpo_iteration.py``'s, 45 tokens each) x 4 responses sampled by our
``rollout.generate`` (<= 24 tokens, T 0.7, seed 0), the policy with its top 4 blocks trainable. Each
measurement is the median of ``--repeats`` runs (wall clock, after one untimed run):

* ``prefill``: the KV-cached prefill of the 32 rows vs of the 8 distinct prompts (each prompt is repeated G
  times: 3/4 of the prefill recomputes the same tokens);
* ``decode_step``: one KV-cached decode step (KV length ~ prompt + 12) at 32, 16 and 8 rows (how the step
  cost scales with the rows still decoding);
* ``train``: the policy's log-probabilities of the response tokens at T with autograd, ``sum().backward()``
  (the top 4 blocks get gradients), three ways: ``padded`` (our path: (32, P + R) rows, the LM head on all
  R + 1 response positions per row), ``padded_head_on_valid`` (the same blocks, the LM head on the valid
  response tokens only), ``packed`` (the real tokens of the 32 rows in ONE row, per-row ``position_ids``
  restarting at 0 and no attention mask: transformers then builds a block-diagonal causal mask; the LM head
  on the valid response tokens only); plus ``no_grad`` forwards of the whole model, padded and packed
  (the cost of a reference or trunk pass);
* ``equal``: the largest |difference| of the packed and the padded log-probabilities over valid tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import grpo_iteration  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch
    from transformers import DynamicCache

    from rlhf_lightning.algorithms.ops import logprobs_from_logits, position_ids_from_mask
    from rlhf_lightning.config.schema import GenerationConfig
    from rlhf_lightning.models import load_policy, load_tokenizer
    from rlhf_lightning.models.forward import response_logprobs
    from rlhf_lightning.rollout.sampler import generate

    torch.set_num_threads(1)
    benchlib.quiet()
    name, gguf = benchlib.model_source(args.model)
    tokenizer = load_tokenizer(name, gguf)
    policy = load_policy(name, gguf, trainable_layers=4)
    rows = grpo_iteration.task_prompts(tokenizer, 8)
    ids = torch.tensor([r["ids"] for r in rows])  # (8, 45): equal lengths, no padding
    group = 4
    prompts = ids.repeat_interleave(group, 0)  # (32, 45)
    mask = torch.ones_like(prompts)
    torch.manual_seed(0)
    config = GenerationConfig(max_new_tokens=24, temperature=0.7)
    ro = generate(policy, prompts, mask, config, tokenizer.eos_token_id, tokenizer.pad_token_id)
    start, valid = ro.response_start, ro.response_mask  # P, (32, R)
    result = {"model": args.model, "versions": benchlib.versions(), "repeats": args.repeats,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "batch": {"rows": ro.input_ids.shape[0], "prompt_columns": start,
                        "response_columns": valid.shape[1], "response_tokens": int(valid.sum()),
                        "cells": ro.input_ids.numel(), "real_tokens": int(ro.attention_mask.sum())}}
    result["batch"]["padding_fraction"] = round(1 - result["batch"]["real_tokens"] / result["batch"]["cells"], 3)
    print(json.dumps(result["batch"]))

    # ---- prefill: 32 rows vs the 8 distinct prompts
    policy.eval()

    def prefill(x):
        with torch.no_grad():
            cache = DynamicCache(config=policy.config)
            policy(input_ids=x, attention_mask=torch.ones_like(x), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
            return cache

    result["prefill_s"] = {"32_rows": timed(lambda: prefill(prompts), args.repeats),
                           "8_distinct": timed(lambda: prefill(ids), args.repeats)}

    # ---- decode step at 32, 16, 8 rows (KV length 45 + 12)
    def decode_step(n: int):
        x = prompts[:n]
        with torch.no_grad():
            cache = prefill(x)
            m = torch.ones(n, x.shape[1], dtype=torch.long)
            token = x[:, -1:]
            for _ in range(12):  # untimed: grow the cache to a mid-response length
                m = torch.cat([m, m.new_ones(n, 1)], 1)
                policy(input_ids=token, attention_mask=m, past_key_values=cache, use_cache=True)
            m = torch.cat([m, m.new_ones(n, 1)], 1)
            pos = torch.full((n, 1), m.shape[1] - 1)
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                policy(input_ids=token, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - t0)
                cache.crop(-1)  # drop the step's entry: the same step again
            return statistics.median(times[1:])

    result["decode_step_s"] = {str(n): decode_step(n) for n in (32, 16, 8)}

    # ---- training forward + backward: padded, padded with the head on valid tokens, packed
    policy.train()
    ids_all, attn = ro.input_ids, ro.attention_mask
    response = ids_all[:, start:]

    def padded():
        lp = response_logprobs(policy, ids_all, attn, start, config.temperature)  # (32, R)
        (lp * valid).sum().backward()
        return lp.detach()

    def padded_head_on_valid():
        hidden = policy.model(input_ids=ids_all, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                              use_cache=False).last_hidden_state[:, start - 1:-1]  # (32, R, H)
        logits = policy.lm_head(hidden[valid])  # (n_valid, V)
        lp = logprobs_from_logits((logits / config.temperature)[None], response[valid][None])[0]
        lp.sum().backward()
        return lp.detach()

    # packed: each row's real tokens (left padding dropped, right padding after EOS dropped), one row
    real = attn.bool()
    packed_ids = ids_all[real][None]  # (1, L)
    positions = position_ids_from_mask(attn)[real][None]  # restarts at 0 for every row
    lengths = real.sum(1)  # (32,)
    offsets = torch.cumsum(lengths, 0) - lengths  # first packed index of each row
    prompt_real = attn[:, :start].sum(1)  # real prompt tokens per row
    # the packed index predicting response token t of row b: offset_b + prompt_real_b - 1 + t
    rows_idx, cols_idx = valid.nonzero(as_tuple=True)
    predict_at = offsets[rows_idx] + prompt_real[rows_idx] - 1 + cols_idx

    def packed():
        hidden = policy.model(input_ids=packed_ids, position_ids=positions, use_cache=False).last_hidden_state[0]
        logits = policy.lm_head(hidden[predict_at])  # (n_valid, V)
        lp = logprobs_from_logits((logits / config.temperature)[None], response[rows_idx, cols_idx][None])[0]
        lp.sum().backward()
        return lp.detach()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    def zero():
        policy.zero_grad(set_to_none=True)

    ref = padded()[valid]
    zero()
    diff = (packed() - ref).abs().max().item()
    zero()
    diff_head = (padded_head_on_valid() - ref).abs().max().item()
    zero()
    result["equal"] = {"packed_vs_padded_max_abs_logprob_diff": diff,
                       "head_on_valid_vs_padded_max_abs_logprob_diff": diff_head}
    train = {}
    for label, fn in (("padded", padded), ("padded_head_on_valid", padded_head_on_valid), ("packed", packed)):
        train[label] = timed(lambda fn=fn: (fn(), zero()), args.repeats)
    result["train_fwd_bwd_s"] = train

    def full_forward_padded():
        policy.model(input_ids=ids_all, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False)

    def full_forward_packed():
        policy.model(input_ids=packed_ids, position_ids=positions, use_cache=False)

    result["no_grad_backbone_s"] = {"padded": timed(no_grad(full_forward_padded), args.repeats),
                                    "packed": timed(no_grad(full_forward_packed), args.repeats)}
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions",)}, indent=1))
    benchlib.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
