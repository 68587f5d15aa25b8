"""Multi-turn rollouts: the policy acts, its tools or an environment answer, and only the policy's tokens train.

An episode starts from a prompt row and alternates the policy's turns with the environment's observations, up to
``ppo.agent.max_turns`` turns (:class:`~rlhf_lightning.config.schema.AgentConfig`):

1. ``environment.reset(row)`` gives the first observation: ``None`` keeps the row's prompt as the datamodule
   encoded it; chat messages (or a string, one user message) replace it.
2. The policy samples a turn (at most ``generation.max_new_tokens`` tokens, cut after its EOS), from the whole
   trajectory so far given as token ids: the turns are never decoded and encoded again.
3. ``environment.step(action)`` reads the turn's text and returns ``(observation, reward, done)`` (or a fourth
   ``info`` dict with ``errors``, a list of error kinds counted in ``agent/errors/<kind>``). Unless the episode is
   done (or out of turns or tokens), the observation is appended as the chat template writes a message of
   ``agent.observation_role`` after an assistant's turn, followed by the template's generation prompt
   (:func:`observation_ids`), and the policy takes the next turn.

The trajectory's tokens are the response of a :class:`~rlhf_lightning.rollout.sampler.Rollout` whose ``loss_mask``
is True on the policy's tokens only (verl's ``response_mask``, SkyRL's ``loss_masks``): the policy loss, the KL,
the critic's values, GAE, the entropy, ``rollout/logprob_diff`` and the TIS weights read it, so the environment's
tokens are context, never trained on.

Tools are plain Python functions (:func:`load_tools`), described to the policy by their JSON schema
(transformers' ``get_json_schema``) in a system message, and called by :class:`ToolEnvironment` when the policy
writes ``<tool_call>...</tool_call>`` (:func:`parse_tool_calls`). A malformed call, an unknown tool, arguments that
do not fit, a tool that raises or one that runs past ``agent.tool_timeout``: the error's text is the observation,
and its kind (:data:`ERROR_KINDS`) is counted. Budgets end an episode cleanly and are counted (:data:`CUT_KINDS`).

Designs read: TRL's ``GRPOTrainer`` (``tools``, ``environment_factory``), verl's agent loop (``response_mask``),
SkyRL's ``BaseTextEnv.step``, OpenEnv's ``reset``/``step``.
"""

from __future__ import annotations

import ast
import inspect
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from rlhf_lightning.algorithms.ops import response_mask_from_eos
from rlhf_lightning.config.schema import AgentConfig, GenerationConfig
from rlhf_lightning.data.tokenization import encode_prompt
from rlhf_lightning.rewards.functions import import_dotted
from rlhf_lightning.rollout.sampler import Rollout, all_finished, sample_responses

__all__ = [
    "CUT_KINDS",
    "DEFAULT_TOOL_PROMPT",
    "ERROR_KINDS",
    "AgentError",
    "Environment",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "load_environment_factory",
    "load_tools",
    "observation_ids",
    "parse_tool_calls",
    "run_episodes",
    "sample_turn",
]

#: The kinds of error a tool call can meet, each counted per batch as ``agent/errors/<kind>`` (mean per episode):
#: ``malformed_call`` (a ``<tool_call>`` whose body is neither JSON nor a call expression, or never closed),
#: ``unknown_tool``, ``invalid_arguments`` (the arguments do not fit the function's signature), ``tool_error``
#: (the tool raised), ``tool_timeout`` (it ran past ``agent.tool_timeout``).
ERROR_KINDS = ("malformed_call", "unknown_tool", "invalid_arguments", "tool_error", "tool_timeout")

#: Why an episode ended early, each counted as ``agent/cut/<kind>`` (share of episodes): ``turn_budget`` (a turn
#: reached ``generation.max_new_tokens`` without its EOS), ``total_budget`` (the next turn or observation would
#: pass ``agent.max_total_tokens``), ``max_turns`` (the environment was not done after ``agent.max_turns`` turns).
CUT_KINDS = ("turn_budget", "total_budget", "max_turns")

#: The default system message of :class:`ToolEnvironment` (``agent.system_prompt``), ``{tools}`` standing for the
#: tools' JSON schemas, one per line.
DEFAULT_TOOL_PROMPT = (
    "You can call these tools:\n{tools}\n"
    "To call one, write <tool_call>{{\"name\": <tool name>, \"arguments\": {{<argument>: <value>}}}}</tool_call> "
    "or <tool_call>name(value, ...)</tool_call>; the result comes back in the next message. "
    "When you know the answer, reply without a tool call."
)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class AgentError(RuntimeError):
    """An environment misbehaved: its ``reset`` or ``step`` raised, or returned something that is not what
    :class:`Environment` promises. One line naming the environment, the method and the episode's row."""


@runtime_checkable
class Environment(Protocol):
    """What an environment of multi-turn rollouts provides (``agent.environment_factory`` builds one per episode):
    Gym's and OpenEnv's ``reset``/``step``, with text actions and observations.

    ``reset(row)``: ``row`` is the prompt row as a dict, ``prompt`` (the chat messages) and the dataset's other
    columns (``answer``, ...). Returns the first observation: ``None`` keeps the row's prompt; a list of chat
    messages is the prompt; a string is the prompt's one user message.

    ``step(action)``: ``action`` is the text of the policy's turn (its EOS and special tokens left out). Returns
    ``(observation, reward, done)`` or ``(observation, reward, done, info)``: the observation is a string shown to
    the policy as a message of ``agent.observation_role`` (ignored when ``done``), the reward a finite number
    (summed over the episode into the score), ``info`` a dict whose ``errors`` (a list of names) are counted in
    ``agent/errors/<name>``: the names of :data:`ERROR_KINDS` or of the class's ``error_kinds`` attribute (a
    tuple of names, so that every rank logs the same metrics).
    """

    def reset(self, row: dict) -> str | list[dict] | None: ...

    def step(self, action: str) -> tuple: ...


# --------------------------------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tool:
    """A plain Python function the policy may call.

    Attributes:
        name: the function's ``__name__`` (what a call names).
        fn: the function.
        schema: its JSON schema as transformers' ``get_json_schema`` derives it from the signature and the
            docstring (OpenAI's ``{"type": "function", "function": {...}}``).
    """

    name: str
    fn: Callable[..., Any]
    schema: dict


def load_tools(specs: Sequence[str | Callable]) -> dict[str, Tool]:
    """The tools of ``agent.tools``: each imported (a dotted path) or taken as it is (a callable), with its schema.

    Returns:
        name → :class:`Tool`, in the order given.

    Raises:
        ValueError: one line naming the spec: an import that fails, an object that is not a function, a function
            ``get_json_schema`` cannot describe (no type hints, no docstring, an argument missing from its ``Args``),
            two tools of one name.
    """
    from transformers.utils import get_json_schema

    tools: dict[str, Tool] = {}
    for i, spec in enumerate(specs):
        label = f"agent.tools[{i}]={spec if isinstance(spec, str) else getattr(spec, '__name__', spec)!r}"
        try:
            fn = import_dotted(spec) if isinstance(spec, str) else spec
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{label}: cannot import it: {err}") from None
        if not callable(fn):
            raise ValueError(f"{label}: a {type(fn).__name__}, not a function")
        try:
            schema = get_json_schema(fn)
        except Exception as err:  # transformers raises TypeError / DocstringParsingException
            raise ValueError(f"{label}: no JSON schema (a typed signature and a docstring with an Args section "
                             f"are needed): {err}") from None
        name = schema["function"]["name"]
        if name in tools:
            raise ValueError(f"{label}: a second tool named {name!r}")
        tools[name] = Tool(name, fn, schema)
    return tools


@dataclass(frozen=True)
class ToolCall:
    """One call read from a turn: ``name``, positional ``args`` and keyword ``kwargs``; or ``error``, the text of
    why the call could not be read (then ``name`` may be empty)."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    error: str | None = None


def _literal(node: ast.expr) -> Any:
    return ast.literal_eval(node)


def _parse_call(body: str) -> ToolCall:
    """One ``<tool_call>`` body: JSON ``{"name": ..., "arguments": {...}}`` (``arguments`` may be a JSON string, as
    OpenAI's API writes it), else a Python call expression with literal arguments."""
    text = body.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            return ToolCall("", error=f"malformed tool call: invalid JSON ({err.msg})")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return ToolCall("", error='malformed tool call: expected {"name": ..., "arguments": {...}}')
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                return ToolCall(obj["name"], error=f"malformed tool call: arguments are not JSON ({err.msg})")
        if not isinstance(arguments, dict):
            return ToolCall(obj["name"], error="malformed tool call: arguments must be an object")
        return ToolCall(obj["name"], kwargs=arguments)
    try:
        node = ast.parse(text, mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ValueError
        args = tuple(_literal(a) for a in node.args)
        kwargs = {k.arg: _literal(k.value) for k in node.keywords}
        if None in kwargs:
            raise ValueError
    except (SyntaxError, ValueError, TypeError):
        return ToolCall("", error='malformed tool call: expected {"name": ..., "arguments": {...}} or '
                                  "name(value, ...) with literal values")
    return ToolCall(node.func.id, args=args, kwargs=kwargs)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls of a turn, in order: each ``<tool_call>BODY</tool_call>``, BODY either JSON
    ``{"name": "add", "arguments": {"a": 1, "b": 2}}`` (the Hermes/Qwen format) or a Python call with literal
    arguments ``add(1, b=2)``. Text outside the tags is ignored.

    Returns:
        One :class:`ToolCall` per tag; a body that reads as neither, or an opening tag never closed, gives a
        call with ``error`` set. No tag: an empty list (the turn is an answer).
    """
    calls, rest = [], text
    while TOOL_CALL_OPEN in rest:
        rest = rest[rest.index(TOOL_CALL_OPEN) + len(TOOL_CALL_OPEN):]
        if TOOL_CALL_CLOSE not in rest:
            calls.append(ToolCall("", error=f"malformed tool call: {TOOL_CALL_OPEN} without {TOOL_CALL_CLOSE}"))
            break
        body, rest = rest.split(TOOL_CALL_CLOSE, 1)
        calls.append(_parse_call(body))
    return calls


def _call_with_timeout(fn: Callable, args: tuple, kwargs: dict, timeout: float) -> tuple[str, Any]:
    """Run ``fn(*args, **kwargs)`` in a daemon thread for at most ``timeout`` seconds: ``("ok", value)``,
    ``("raised", exception)`` or ``("timeout", None)`` (the thread is left running)."""
    outcome: list = []

    def target():
        try:
            outcome.append(("ok", fn(*args, **kwargs)))
        except BaseException as err:  # noqa: BLE001 — a tool's failure is the model's observation
            outcome.append(("raised", err))

    thread = threading.Thread(target=target, daemon=True, name=f"tool-{getattr(fn, '__name__', 'call')}")
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else ("timeout", None)


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def run_tool_call(call: ToolCall, tools: dict[str, Tool], timeout: float) -> tuple[str, str | None]:
    """The observation of one call and its error kind (``None``: it succeeded): the tool's result as text (JSON
    for what is not a string), or ``error: ...`` naming what went wrong (:data:`ERROR_KINDS`)."""
    if call.error is not None:
        return f"error: {call.error}", "malformed_call"
    tool = tools.get(call.name)
    if tool is None:
        return f"error: unknown tool {call.name!r} (tools: {', '.join(tools)})", "unknown_tool"
    try:
        inspect.signature(tool.fn).bind(*call.args, **call.kwargs)
    except TypeError as err:
        return f"error: {call.name}: {err}", "invalid_arguments"
    status, value = _call_with_timeout(tool.fn, call.args, call.kwargs, timeout)
    if status == "timeout":
        return f"error: {call.name} timed out after {timeout:g} s", "tool_timeout"
    if status == "raised":
        return f"error: {call.name} raised {type(value).__name__}: {value}", "tool_error"
    return _result_text(value), None


class ToolEnvironment:
    """The environment of plain Python functions (``agent.tools``): its ``reset`` adds the tools' description to the
    prompt, its ``step`` runs the calls of the policy's turn.

    Args:
        tools: name → :class:`Tool` (:func:`load_tools`).
        timeout: seconds per call (``agent.tool_timeout``).
        system_prompt: the description's template, ``{tools}`` standing for the schemas (``None``:
            :data:`DEFAULT_TOOL_PROMPT`).
    """

    def __init__(self, tools: dict[str, Tool], timeout: float, system_prompt: str | None = None):
        self.tools, self.timeout = tools, timeout
        self.system_prompt = system_prompt or DEFAULT_TOOL_PROMPT

    def reset(self, row: dict) -> list[dict]:
        """The row's prompt messages with the tools described in the system message (appended to the prompt's own
        system message, or a new one first)."""
        description = self.system_prompt.format(tools="\n".join(json.dumps(t.schema) for t in self.tools.values()))
        messages = [dict(m) for m in row["prompt"]]
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{description}"
            return messages
        return [{"role": "system", "content": description}, *messages]

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Run the turn's calls (:func:`parse_tool_calls`, :func:`run_tool_call`): their results, one per line, are
        the observation. A turn without a call is the answer: the episode is done. The reward is 0 (the score
        comes from the reward functions or the reward model, on the whole trajectory)."""
        calls = parse_tool_calls(action)
        if not calls:
            return "", 0.0, True, {"tool_calls": 0, "errors": []}
        results = [run_tool_call(call, self.tools, self.timeout) for call in calls]
        return ("\n".join(text for text, _ in results), 0.0, False,
                {"tool_calls": len(calls), "errors": [kind for _, kind in results if kind is not None]})


def load_environment_factory(config: AgentConfig) -> Callable[[], Any]:
    """A function that builds one environment per episode: ``environment_factory(**environment_kwargs)``, or a
    :class:`ToolEnvironment` of ``tools``.

    Raises:
        ValueError: one line naming the setting: nothing to build (``agent`` off), a factory that cannot be
            imported or is not callable, a tool that cannot be loaded (:func:`load_tools`).
    """
    if config.tools:
        tools = load_tools(config.tools)
        return lambda: ToolEnvironment(tools, config.tool_timeout, config.system_prompt)
    if config.environment_factory is None:
        raise ValueError("ppo.agent: set tools or environment_factory for multi-turn rollouts")
    try:
        factory = import_dotted(config.environment_factory)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"ppo.agent.environment_factory={config.environment_factory!r}: cannot import it: "
                         f"{err}") from None
    if not callable(factory):
        raise ValueError(f"ppo.agent.environment_factory={config.environment_factory!r} is a "
                         f"{type(factory).__name__}, not a class or a function")
    kwargs = dict(config.environment_kwargs)
    return lambda: factory(**kwargs)


# --------------------------------------------------------------------------------------------------- tokens


def observation_ids(tokenizer, content: str, role: str = "tool") -> list[int]:
    """The token ids that follow the policy's EOS when the environment answers: what the chat template writes after
    an assistant turn's end marker, a message of ``role`` holding ``content`` with its role markers, then the
    generation prompt of the next assistant turn. For SmolLM2's ChatML,
    ``\\n<|im_start|>tool\\n{content}<|im_end|>\\n<|im_start|>assistant\\n``.

    Found by rendering a two-message conversation with and without the observation and keeping what follows the
    assistant's EOS text; only this text is tokenized (the policy's turns never are).

    Raises:
        ValueError: the tokenizer has no chat template, or its rendering of the longer conversation does not start
            with that of the shorter one.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("multi-turn rollouts need a tokenizer with a chat template (the role markers of the "
                         "environment's messages)")
    base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template([*base, {"role": role, "content": content}], tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError(f"the chat template writes the conversation before a {role!r} message differently with "
                         "and without it: the observation's tokens cannot be appended to the trajectory")
    eos, content_at = tokenizer.eos_token or "", before.rfind("!")  # the assistant's content, then its end marker
    end = before.find(eos, content_at) if eos else -1
    cut = end + len(eos) if end >= 0 else len(before)
    return [int(i) for i in tokenizer(after[cut:], add_special_tokens=False)["input_ids"]]


# --------------------------------------------------------------------------------------------------- sampling


def _left_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_turn(policy: nn.Module, contexts: list[list[int]], config: GenerationConfig, limit: int,
                eos_token_id: int | list[int], pad_token_id: int, do_sample: bool = True, engine=None,
                noise: torch.Tensor | None = None) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """One turn of every context: at most ``limit`` tokens each, cut after the first EOS, by the policy's KV-cached
    loop (:func:`~rlhf_lightning.rollout.sampler.sample_responses`, its ranks in lock-step) or a vLLM engine.

    Args:
        policy: the causal LM (put in eval mode while sampling, then restored).
        contexts: each row's trajectory so far, token ids (prompt, turns, observations).
        config: the sampling settings (``max_new_tokens`` replaced by ``limit``).
        limit: tokens at most this turn.
        eos_token_id, pad_token_id: the tokenizer's.
        do_sample: False decodes greedily.
        engine: a :class:`~rlhf_lightning.rollout.vllm_engine.VLLMEngine`, or ``None``.
        noise: ``(len(contexts), >= limit)`` the HF loop's per-row numbers (``None``: torch's generator).

    Returns:
        per row: the sampled tokens up to and including the EOS, their sampler log-probabilities, and whether the
        turn ended with the EOS.
    """
    ids, mask = _left_pad(contexts, pad_token_id, policy.device if engine is None else "cpu")
    turn_config = replace(config, max_new_tokens=limit)
    if engine is not None:
        tokens, logprobs = engine.sample(ids, mask, eos_token_id, pad_token_id, do_sample=do_sample,
                                         max_new_tokens=limit)
    else:
        was_training = policy.training
        policy.eval()
        try:
            tokens, logprobs = sample_responses(policy, ids, mask, turn_config, eos_token_id, pad_token_id,
                                                do_sample=do_sample, noise=noise)
        finally:
            policy.train(was_training)
    valid, ended = response_mask_from_eos(tokens, eos_token_id)
    lengths = valid.sum(1).tolist()
    tokens, logprobs = tokens.tolist(), logprobs.float().tolist()
    return ([row[:n] for row, n in zip(tokens, lengths, strict=True)],
            [row[:n] for row, n in zip(logprobs, lengths, strict=True)], ended.tolist())


# --------------------------------------------------------------------------------------------------- episodes


@dataclass
class _Episode:
    """One episode in progress: its environment, prompt, trajectory and counts."""

    env: Any
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    ended_with_eos: bool = False
    counts: dict[str, float] = field(default_factory=dict)

    def count(self, name: str, n: float = 1.0) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + n

    def append(self, tokens: list[int], logprobs: list[float] | None) -> None:
        self.tokens += tokens
        self.policy += [logprobs is not None] * len(tokens)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)


def error_kinds(env) -> tuple[str, ...]:
    """The error kinds counted for ``env``'s episodes: :data:`ERROR_KINDS` and the names of its ``error_kinds``
    attribute (an environment declares the kinds its ``step`` may report in ``info["errors"]``, so every rank logs
    the same metrics)."""
    own = getattr(env, "error_kinds", ())
    return tuple(dict.fromkeys([*ERROR_KINDS, *own]))


def _reset(env, row: dict, index: int, tokenizer, prompt_ids: list[int]) -> list[int]:
    """The episode's prompt ids from ``env.reset(row)`` (:class:`Environment`)."""
    name = type(env).__name__
    try:
        first = env.reset(row)
    except Exception as err:
        raise AgentError(f"environment {name}.reset raised on row {index}: {type(err).__name__}: {err}") from err
    if first is None:
        return prompt_ids
    if isinstance(first, str):
        first = [{"role": "user", "content": first}]
    if not isinstance(first, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in first):
        raise AgentError(f"environment {name}.reset returned {type(first).__name__} on row {index}; expected None, "
                         "a string or a list of chat messages")
    return encode_prompt(tokenizer, first)


def _step(env, action: str, index: int) -> tuple[str | None, float, bool, dict]:
    """``env.step(action)`` checked (:class:`Environment`)."""
    name = type(env).__name__
    try:
        out = env.step(action)
    except Exception as err:
        raise AgentError(f"environment {name}.step raised on row {index}: {type(err).__name__}: {err}") from err
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise AgentError(f"environment {name}.step returned {type(out).__name__} on row {index}; expected "
                         "(observation, reward, done) or (observation, reward, done, info)")
    observation, reward, done = out[:3]
    info = out[3] if len(out) == 4 and out[3] is not None else {}
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or reward != reward \
            or abs(reward) == float("inf"):
        raise AgentError(f"environment {name}.step returned the reward {reward!r} on row {index}; expected a finite "
                         "number (0.0 for none)")
    if not done and not isinstance(observation, str):
        raise AgentError(f"environment {name}.step returned the observation {observation!r} on row {index} with "
                         "done false; expected a string")
    if not isinstance(info, dict):
        raise AgentError(f"environment {name}.step returned info {type(info).__name__} on row {index}; expected a "
                         "dict")
    return observation, float(reward), bool(done), info


def run_episodes(sample: Callable[[list[list[int]], list[int], int, int], tuple[list, list, list]],
                 prompt_ids: list[list[int]], rows: list[dict], make_environment: Callable[[], Any],
                 config: AgentConfig, max_new_tokens: int, tokenizer, pad_token_id: int,
                 device: torch.device | str = "cpu") -> Rollout:
    """Run one episode per prompt row, its turns in lock-step with the other rows and ranks.

    Each turn, every episode still running samples a turn (``sample``), appends it (policy tokens, ``loss_mask``
    1, the sampler's log-probabilities), and, if the turn ended with its EOS, gives its text to ``step``; unless
    the episode is done, the observation's tokens (:func:`observation_ids`; ``loss_mask`` 0, log-probability 0)
    are appended. Episodes end when the environment is done, after ``config.max_turns`` turns, at a turn cut by
    ``max_new_tokens``, or when a turn or an observation would pass ``config.max_total_tokens`` (the turn is cut
    at the budget; an observation is left out). The turns are decided together: a turn runs while any episode of
    any rank is running (one all-reduce a turn), and a rank with none left samples one row it discards, so every
    rank runs the same number of forwards (:func:`~rlhf_lightning.rollout.sampler.sample_responses`).

    Args:
        sample: ``sample(contexts, rows, turn, limit)`` → ``(tokens, logprobs, ended)``, lists per context as
            :func:`sample_turn` returns them; ``rows`` are the contexts' indices among the episodes (the noise's
            keys), ``limit`` the turn's token budget.
        prompt_ids: B prompts' token ids (the datamodule's encoding; kept when ``reset`` returns ``None``).
        rows: B prompt rows given to ``reset`` (``prompt``, the chat messages, and the dataset's columns).
        make_environment: builds one environment per episode (:func:`load_environment_factory`).
        config: ``ppo.agent``.
        max_new_tokens: the per-turn budget (``generation.max_new_tokens``).
        tokenizer: the policy's (its chat template writes the observations; turns are decoded for ``step``).
        pad_token_id: padding of the rollout.
        device: where the rollout's tensors go.

    Returns:
        The trajectories as a :class:`~rlhf_lightning.rollout.sampler.Rollout` with a ``loss_mask``, the
        environment's rewards summed per episode (``env_rewards``) and the per-episode counts (``episode_stats``:
        ``turns``, ``tool_calls``, ``policy_tokens``, ``env_tokens``, ``errors/<kind>`` (:data:`ERROR_KINDS`, and
        the kinds an environment names), ``cut/<kind>`` (:data:`CUT_KINDS`, 0 or 1)).

    Raises:
        AgentError: an environment's ``reset`` or ``step`` raised or returned something else than documented.
    """
    episodes = []
    for index, (ids, row) in enumerate(zip(prompt_ids, rows, strict=True)):
        env = make_environment()
        episodes.append(_Episode(env, _reset(env, row, index, tokenizer, list(ids))))
    kinds = error_kinds(episodes[0].env)
    budget = config.max_total_tokens
    for turn in range(config.max_turns):
        active = [i for i, e in enumerate(episodes) if not e.done]
        if all_finished(torch.tensor([not active], device=device)):  # every rank: the same turns
            break
        contexts = [episodes[i].prompt + episodes[i].tokens for i in active] or [episodes[0].prompt]
        limit = min(max_new_tokens, max((budget - len(episodes[i].tokens) for i in active), default=1))
        tokens, logprobs, ended = sample(contexts, active or [0], turn, limit)
        for i, turn_tokens, turn_logprobs, eos in zip(active, tokens, logprobs, ended, strict=False):
            episode = episodes[i]
            own_limit = min(max_new_tokens, budget - len(episode.tokens))  # this row's, whatever the batch's
            if len(turn_tokens) > own_limit:
                turn_tokens, turn_logprobs, eos = turn_tokens[:own_limit], turn_logprobs[:own_limit], False
            episode.count("turns")
            episode.append(turn_tokens, turn_logprobs)
            episode.ended_with_eos = eos
            if not eos:
                episode.count("cut/turn_budget" if own_limit == max_new_tokens else "cut/total_budget")
                episode.done = True
                continue
            action = tokenizer.decode(turn_tokens, skip_special_tokens=True)
            observation, reward, done, info = _step(episode.env, action, i)
            episode.reward += reward
            episode.count("tool_calls", float(info.get("tool_calls", 0)))
            for kind in info.get("errors", ()):
                if kind not in kinds:
                    raise AgentError(f"environment {type(episode.env).__name__}.step reported the error kind {kind!r} "
                                     f"on row {i}; declare it in the class's error_kinds (known: {', '.join(kinds)})")
                episode.count(f"errors/{kind}")
            if done:
                episode.done = True
            elif turn + 1 == config.max_turns:
                episode.count("cut/max_turns")
                episode.done = True
            else:
                answer = observation_ids(tokenizer, observation, config.observation_role)
                if len(episode.tokens) + len(answer) >= budget:  # no room left for the policy's next turn
                    episode.count("cut/total_budget")
                    episode.done = True
                else:
                    episode.append(answer, None)
                    episode.count("env_tokens", len(answer))
    return _assemble(episodes, kinds, pad_token_id, device)


def _assemble(episodes: list[_Episode], kinds: Sequence[str], pad_token_id: int, device) -> Rollout:
    """The episodes as one rollout (prompts left-padded, trajectories right-padded)."""
    prompt_ids, prompt_mask = _left_pad([e.prompt for e in episodes], pad_token_id, device)
    width = max(1, max(len(e.tokens) for e in episodes))
    n = len(episodes)
    response = torch.full((n, width), pad_token_id, dtype=torch.long)
    valid = torch.zeros((n, width), dtype=torch.bool)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    logprobs = torch.zeros((n, width), dtype=torch.float32)
    for row, e in enumerate(episodes):
        length = len(e.tokens)
        response[row, :length] = torch.tensor(e.tokens, dtype=torch.long)
        valid[row, :length] = True
        loss_mask[row, :length] = torch.tensor(e.policy, dtype=torch.bool)
        logprobs[row, :length] = torch.tensor(e.logprobs, dtype=torch.float32)
    names = {"turns", "tool_calls", "env_tokens", *(f"errors/{k}" for k in kinds), *(f"cut/{k}" for k in CUT_KINDS)}
    stats = {name: torch.tensor([e.counts.get(name, 0.0) for e in episodes], dtype=torch.float32, device=device)
             for name in sorted(names)}
    stats["policy_tokens"] = loss_mask.sum(1).float().to(device)
    return Rollout(input_ids=torch.cat([prompt_ids, response.to(device)], 1),
                   attention_mask=torch.cat([prompt_mask, valid.long().to(device)], 1),
                   response_start=prompt_ids.shape[1], response_mask=valid.to(device),
                   ends_with_eos=torch.tensor([e.ended_with_eos for e in episodes], device=device),
                   sampler_logprobs=logprobs.to(device), loss_mask=loss_mask.to(device),
                   env_rewards=torch.tensor([e.reward for e in episodes], dtype=torch.float32, device=device),
                   episode_stats=stats)
