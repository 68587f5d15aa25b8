"""PPO iteration: ours (PPOModule under Lightning's Trainer.fit) vs TRL 1.12's PPOTrainer (trl.experimental.ppo).

    PYTHONPATH=. python bench/ppo_iteration.py --model tiny --steps 20
    PYTHONPATH=. python bench/ppo_iteration.py --model smollm2 --steps 6
    PYTHONPATH=. python bench/ppo_iteration.py --model smollm2 --steps 3 --vllm   # + ours with vLLM rollouts

Workload (identical for both): the same 8 hh-rlhf harmless prompts (chat template, at most 64
tokens, left-padded) every iteration; policy, frozen reference, critic and frozen reward model all
built by our loaders from the same source with the same seeds (critic seed 0, reward model seed 1);
32 sampled tokens per prompt (temperature 1, no top-k/top-p), reward-model score, reference
log-probabilities, values, k1 KL penalty β=0.05, GAE (γ 1, λ 0.95), whitened advantages, then ONE
PPO epoch of ONE minibatch (clipped policy loss ε 0.2 + 0.1·clipped value loss), fused AdamW lr 3e-6
(ours: one optimizer per network; TRL: one over both), no gradient clipping (TRL's PPO does not
clip; ours runs with ``ppo.max_grad_norm=None``), no sample generations, no checkpoints.

Response length: TRL runs with ``stop_token=None`` (it never stops early); ours stops
generating when every row has produced EOS. The generated columns of every iteration of both
sides are recorded (``generated_columns``): all 32 unless noted, so both train on equal shapes.

``--lora R`` adds a third side, ``ours_lora``: ours with LoRA adapters of rank R (alpha 32, every linear
layer of every block) on the policy and the critic (its head trained in full), the reference being the
policy with its adapters switched off (no copy), the reward model as above; same workload and lr.
``--share-base`` puts that side's critic on the policy's base as a second adapter (``critic.share_base=true``);
``--gradient-checkpointing`` makes that side recompute activations in backward (``model.gradient_checkpointing``).

Timed: one iteration of each framework's own loop (see ``benchlib``): Lightning's fit loop to
``on_train_batch_end``, TRL's ``train()`` loop body to ``on_step_end``, alternating ours/TRL in one
process after ``--warmup`` iterations each. ``generate`` is timed separately on both sides for the
generation tokens/s. Peak memory: each side alone in a child process.

``--vllm`` adds a third side, ours with ``ppo.generation.backend=vllm`` (the vLLM engine built at fit start,
the policy's weights loaded into it after every update: inside the timed iteration), in the same
round-robin (vllm, ours, TRL); its fit's start-up, engine included, is reported apart
(``vllm_engine_start_s``: from building the loop to its first iteration's start). ``--vllm --lora R`` adds
``vllm_lora`` too: ours with vLLM rollouts and the LoRA adapters (the engine gets the merged weights after every
update). One engine per process: time one of the two vLLM sides per run (``--time vllm_lora,ours_lora,trl``).

``--lora R --trl-lora`` adds ``trl_lora``: TRL's PPOTrainer given a ``peft_config`` (peft's LoRA of rank R,
alpha 32, every linear layer of the ``--lora-layers`` top blocks) on the policy, its reference being the policy
with the adapter off. TRL's PPOTrainer takes no adapter for the critic: it trains in full there.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PROMPTS, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 64, 32
LR, KL_COEF = 3e-6, 0.05


def hh_prompts(tokenizer, n: int = PROMPTS) -> list[list[int]]:
    """Token ids of ``n`` hh-rlhf harmless prompts (seeded subset) encoded by our PromptDataModule."""
    from rlhf_lightning.data import PromptDataModule

    dm = PromptDataModule(tokenizer, str(benchlib.DATA), max_prompt_length=PROMPT_TOKENS, val_size=0, limit=n,
                          batch_size=n, seed=0)
    dm.setup()
    return dm.prompt_ids


_FROZEN: dict = {}  # with --vllm: the frozen reference and reward model, loaded once and read by every side


def load_models(args, dtype: str, device, settings: dict | None = None) -> dict:
    """Policy, reference, critic, reward model: same sources and seeds for all sides. ``settings``: the
    ``model.lora`` of the policy and the critic (the reference is then ``None``: the policy with its adapters
    off). With ``--vllm`` the frozen two are one copy shared by the sides (they are only read; 3 × 4 SmolLM2
    networks with the trained ones' gradients and AdamW states would not fit in this machine's memory)."""
    from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
    from rlhf_lightning.models.builders import PolicyBaseCritic

    name, gguf = benchlib.model_source(args.model)
    key = (name, dtype, str(device))
    shared = getattr(args, "vllm", False)
    frozen = _FROZEN.get(key) if shared else None
    if frozen is None:
        frozen = {"ref": None if settings and not shared else load_reference(name, gguf, dtype=dtype).to(device),
                  "reward": load_scalar_model(name, gguf, dtype=dtype, frozen=True, seed=1).to(device)}
        if shared:
            _FROZEN[key] = frozen
    checkpointing = bool(settings) and getattr(args, "gradient_checkpointing", False)
    models = {"policy": load_policy(name, gguf, dtype=dtype, lora=settings,
                                    gradient_checkpointing=checkpointing).to(device)}
    if settings and getattr(args, "share_base", False):  # built on the policy by PPOModule
        models["critic"] = PolicyBaseCritic.from_source(name, seed=0, lora=settings)
    else:
        models["critic"] = load_scalar_model(name, gguf, dtype=dtype, seed=0, lora=settings,
                                             gradient_checkpointing=checkpointing).to(device)
    return {**models, "reward": frozen["reward"], "ref": None if settings else frozen["ref"]}


def record_generation(fn, log: list, sync, prompt_columns):
    """``fn`` wrapped to append (generated columns, seconds) of every call to ``log``.

    ``prompt_columns(args, kwargs, out)`` -> (prompt columns, total columns) of a call's result."""

    def wrapper(*args, **kwargs):
        if sync:
            sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if sync:
            sync()
        prompt, total = prompt_columns(args, kwargs, out)
        log.append((total - prompt, time.perf_counter() - start))
        return out

    return wrapper


def ours_loop(args, tokenizer, prompts, alternation, dtype, device, gen_log, sync, backend: str = "hf",
              side: str = "ours"):
    """A callable running Trainer.fit on PPOModule for warmup + steps iterations (``backend``: the rollouts';
    ``side`` ours_lora or vllm_lora: with ``--lora``'s adapters)."""
    import lightning as L
    from torch.utils.data import DataLoader

    import rlhf_lightning.modules.ppo as ppo_module
    from rlhf_lightning.data import PromptCollator
    from rlhf_lightning.data.datamodule import ListDataset
    from rlhf_lightning.modules import PPOModule

    total = args.warmup + args.steps
    m = load_models(args, dtype, device, benchlib.lora_settings(args, side))
    # our PPOModule samples with rlhf_lightning.rollout.sampler.generate (imported into modules.ppo); with several of
    # our
    # sides in the process, one wrapper records each call in the log of the side whose loop thread called it
    if not hasattr(ppo_module.generate, "wrapped"):
        plain = ppo_module.generate

        def generate(*a, **k):
            return generate.wrapped[generate.sides[threading.get_ident()]](*a, **k)

        generate.plain, generate.wrapped, generate.sides = plain, {}, {}
        ppo_module.generate = generate
    ppo_module.generate.wrapped[side] = record_generation(ppo_module.generate.plain, gen_log, sync,
                                                         lambda a, k, ro: (ro.response_start, ro.input_ids.shape[1]))
    ppo = {"ppo_epochs": 1, "num_minibatches": 1, "kl_coef": KL_COEF, "max_grad_norm": None,
           "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
           "generation": {"max_new_tokens": RESPONSE_TOKENS, "temperature": 1.0, "backend": backend,
                          "vllm": {"enforce_eager": not args.vllm_compiled}}}
    module = PPOModule(m["policy"], m["ref"], m["critic"], m["reward"], tokenizer, ppo=ppo,
                       policy_optim={"lr": LR}, critic_optim={"lr": LR})
    loader = DataLoader(ListDataset([{"input_ids": ids, "prompt_index": i} for i, ids in enumerate(prompts)]),
                        batch_size=PROMPTS, shuffle=False, collate_fn=PromptCollator(tokenizer.pad_token_id))

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):  # after PPOModule.on_fit_start built the engine
            ppo_module.generate.sides[threading.get_ident()] = side
            if pl_module.engine is not None:
                engine_start["s"] = time.perf_counter() - engine_start["t0"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            alternation.step_end(side)

    engine_start = ENGINE_START
    engine_start["t0"] = time.perf_counter()

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-true" if dtype == "bfloat16" else "32-true",
                        max_steps=module.optimizer_steps_per_iteration * total, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()])
    return lambda: trainer.fit(module, train_dataloaders=loader)


def trl_loop(args, tokenizer, prompts, alternation, dtype, device, gen_log, sync, side: str = "trl"):
    """A callable running TRL's PPOTrainer.train for warmup + steps iterations (``side`` trl_lora: with a
    ``peft_config`` for the policy, see the module's doc)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    total = args.warmup + args.steps
    m = load_models(args, dtype, device)
    peft_config = None
    if side == benchlib.TRL_LORA_SIDE:
        from peft import LoraConfig
        from torch import nn

        blocks = m["policy"].config.num_hidden_layers
        top = range(blocks - (args.lora_layers or blocks), blocks)
        linears = sorted({name.rsplit(".", 1)[-1] for name, module in m["policy"].model.layers.named_modules()
                          if isinstance(module, nn.Linear)})  # every linear layer of the blocks, as ours
        peft_config = LoraConfig(r=args.lora, lora_alpha=32, lora_dropout=0.0, target_modules=linears,
                                 layers_to_transform=list(top), task_type="CAUSAL_LM")
        m["ref"] = None  # TRL's reference with a peft_config: the policy with its adapter off
    # TRL samples with transformers' generate on the policy
    m["policy"].generate = record_generation(m["policy"].generate, gen_log, sync,
                                             lambda a, k, out: (k["input_ids"].shape[1], out.sequences.shape[1]))
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-ppo-"), per_device_train_batch_size=PROMPTS,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, total_episodes=PROMPTS * total,
        response_length=RESPONSE_TOKENS, stop_token=None, temperature=1.0, kl_coef=KL_COEF, kl_estimator="k1",
        cliprange=0.2, vf_coef=0.1, cliprange_value=0.2, gamma=1.0, lam=0.95, learning_rate=LR,
        lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False,
        use_cpu=device.type == "cpu", report_to="none", save_strategy="no", num_sample_generations=0,
        disable_tqdm=True, logging_steps=10, seed=0)

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            alternation.step_end(side)

    dataset = Dataset.from_dict({"input_ids": prompts})
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=m["policy"], ref_model=m["ref"],
                         reward_model=m["reward"], value_model=m["critic"], train_dataset=dataset,
                         eval_dataset=dataset, callbacks=[Clock()], peft_config=peft_config)
    return trainer.train


ENGINE_START: dict[str, float] = {}  # the vLLM side's engine start-up, seconds (fit start to engine built)


def add_arguments(parser) -> None:
    """This script's own options."""
    parser.add_argument("--vllm", action="store_true", help="add ours with vLLM rollouts as a third side")
    parser.add_argument("--vllm-compiled", action="store_true",
                        help="the vLLM sides' engine compiled (ppo.generation.vllm.enforce_eager=false)")
    parser.add_argument("--trl-lora", action="store_true",
                        help=f"with --lora: add TRL with a LoRA policy (peft_config), side {benchlib.TRL_LORA_SIDE}")


def main(argv=None) -> dict | None:
    import torch

    args, tokenizer, device, dtype, sync = benchlib.start(
        __doc__.splitlines()[0], argv,
        add_arguments)
    prompts = hh_prompts(tokenizer)
    gen_logs = {side: [] for side in benchlib.sides_of(args)}
    builders = {"ours": lambda alt: ours_loop(args, tokenizer, prompts, alt, dtype, device, gen_logs["ours"], sync),
                "vllm": lambda alt: ours_loop(args, tokenizer, prompts, alt, dtype, device, gen_logs["vllm"], sync,
                                              backend="vllm", side="vllm"),
                "trl": lambda alt: trl_loop(args, tokenizer, prompts, alt, dtype, device, gen_logs["trl"], sync)}
    builders[benchlib.TRL_LORA_SIDE] = lambda alt: trl_loop(args, tokenizer, prompts, alt, dtype, device,
                                                            gen_logs[benchlib.TRL_LORA_SIDE], sync,
                                                            side=benchlib.TRL_LORA_SIDE)
    if args.lora:
        for side, backend in ((benchlib.LORA_SIDE, "hf"), (benchlib.VLLM_LORA_SIDE, "vllm")):
            builders[side] = lambda alt, side=side, backend=backend: ours_loop(
                args, tokenizer, prompts, alt, dtype, device, gen_logs[side], sync, backend=backend, side=side)
    torch.manual_seed(0)
    ran = benchlib.run_sides(args, builders, sync, __file__, argv)
    if ran is None:
        return None
    alternation, memory = ran
    prompt_cols = max(len(p) for p in prompts)
    columns = {s: [c for c, _ in log] for s, log in gen_logs.items()}
    gen_s = {s: sorted(t for _, t in log[args.warmup:]) for s, log in gen_logs.items()}
    from rlhf_lightning.models import load_policy

    n_params = sum(p.numel() for p in load_policy(*benchlib.model_source(args.model), dtype=dtype).parameters())
    train_tokens = PROMPTS * (prompt_cols + RESPONSE_TOKENS)
    extra = {"batch": f"{PROMPTS} prompts, left-padded to {prompt_cols} tokens (lengths {[len(p) for p in prompts]}) "
                      f"+ {RESPONSE_TOKENS} sampled", "generated_columns": columns,
             "generate_median_s": {s: t[len(t) // 2] if t else None for s, t in gen_s.items()},
             "policy_params": n_params, "threads": torch.get_num_threads(), "lora_r": args.lora,
             "lora_layers": args.lora_layers, "share_base": args.share_base,
             "gradient_checkpointing": args.gradient_checkpointing, "vllm_compiled": args.vllm_compiled}
    if "s" in ENGINE_START:
        extra["vllm_engine_start_s"] = ENGINE_START["s"]
    result = benchlib.report("ppo_iteration", args, alternation, memory, extra,
                             tokens={"train (prompt+response)": train_tokens},
                             flops_per_step=6 * 2 * n_params * train_tokens)  # policy + critic, fwd + bwd
    rates = {side: PROMPTS * RESPONSE_TOKENS / t[len(t) // 2] for side, t in gen_s.items() if t}
    for side, rate in rates.items():
        print(f"  {side}: generation {rate:.1f} tokens/s (median generate call)")
    result["generation_tokens_per_s"] = rates
    for vllm_side, hf_side in ((benchlib.VLLM_SIDE, "ours"), (benchlib.VLLM_LORA_SIDE, benchlib.LORA_SIDE)):
        if vllm_side in rates and hf_side in rates:
            key = f"{vllm_side}_generation_speedup"
            result[key] = rates[vllm_side] / rates[hf_side]
            print(f"  generation tokens/s, {vllm_side} / {hf_side} (our HF loop): {result[key]:.2f}x")
    benchlib.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
