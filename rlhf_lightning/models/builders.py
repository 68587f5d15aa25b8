"""Builders for the four networks of RLHF: policy, frozen reference, reward model and critic.

The reward model and the critic are both ``AutoModelForSequenceClassification`` with one label:
a backbone plus a linear ``score`` head applied to every position. The reward model reads the
head at the last non-padding token (one score per sequence); the critic reads it at every
response token (V(s_t)). Saved with ``save_pretrained``, either reloads with
``AutoModelForSequenceClassification.from_pretrained(path)`` and returns the reward as its
single output.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.config.schema import LoRASettings
from rlhf_lightning.models.loading import fix_pad_token, resolve_pretrained
from rlhf_lightning.models.lora import (
    ADAPTER,
    ADAPTER_SUFFIX,
    CRITIC_ADAPTER,
    adapter_name_of,
    apply_lora,
    base_model_name,
    critic_on_policy_base,
    has_lora,
    lora_settings,
    stacked_adapter,
)
from rlhf_lightning.models.parts import (
    SCALAR_HEAD_NAMES,
    decoder_layers,
    register_scalar_model,
    scalar_model_config,
    score_head,
)

log = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer of a model source (see :func:`resolve_pretrained`).

    Padding is on the left (prompts are left-padded for generation; the collators place
    responses explicitly). A padding token distinct from EOS is chosen where the vocabulary has one.

    Raises:
        FileNotFoundError: the source does not exist.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path, gguf_file),
                                              trust_remote_code=trust_remote_code)
    fix_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def _is_dropout_rate(name: str, value: object) -> bool:
    return isinstance(value, float) and ("dropout" in name.lower() or name.lower().endswith("pdrop"))


def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch every dropout of ``model`` off, in place (RLHF needs deterministic log-probabilities and values).

    Three places hold a rate, and each is set to 0: the ``p`` of every ``torch.nn`` dropout module;
    every float attribute of a submodule whose name contains ``dropout`` or ends in ``pdrop``
    (attention layers copy ``config.attention_dropout`` when built, e.g. ``LlamaAttention.attention_dropout``,
    and pass it to the attention function in train mode); and the same fields of the model's config and
    its sub-configs (so a saved or copied model keeps them off). Editing only the config after the
    model is built leaves the copies on.

    Returns:
        The model.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    configs = [getattr(model, "config", None)]
    while configs:
        config = configs.pop()
        if config is None:
            continue
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value):
                setattr(config, name, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config, ...)
                configs.append(value)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a model in place: no parameter requires a gradient, eval mode. Returns the model."""
    model.requires_grad_(False)
    model.eval()
    return model


def train_top_layers(model: nn.Module, trainable_layers: int | None) -> nn.Module:
    """Train only the top ``trainable_layers`` blocks plus the final norm and heads.

    The embeddings and the lower blocks are frozen, so backward stops at the first trainable
    block (a cheaper step on CPU). ``None`` trains everything. With tied input/output
    embeddings the language-model head is frozen with the embeddings.

    Raises:
        ValueError: ``trainable_layers`` is negative.
    """
    if trainable_layers is None:
        return model
    if trainable_layers < 0:
        raise ValueError(f"trainable_layers={trainable_layers} must be >= 0 or null")
    layers = decoder_layers(model)
    model.get_input_embeddings().requires_grad_(False)
    for block in list(layers)[: max(len(layers) - trainable_layers, 0)]:
        block.requires_grad_(False)
    return model


def _finish(model: nn.Module, trainable_layers: int | None, gradient_checkpointing: bool,
            lora: dict | None = None, head: nn.Module | None = None) -> nn.Module:
    settings = lora_settings(lora)
    if settings is not None and trainable_layers is not None:
        raise ValueError("model.trainable_layers and model.lora.r are exclusive: with LoRA, "
                         "model.lora.layers limits the adapters to the top blocks")
    model.train()  # from_pretrained returns eval mode; dropout is off either way
    disable_dropout(model)
    train_top_layers(model, trainable_layers)
    if settings is not None:  # after disable_dropout: the adapters' dropout is model.lora.dropout
        apply_lora(model, settings, head=head)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_policy(name_or_path: str, gguf_file: str | None = None, dtype: str = "float32",
                trainable_layers: int | None = None, gradient_checkpointing: bool = False,
                trust_remote_code: bool = False, lora: dict | None = None, **_: object) -> nn.Module:
    """A causal LM to train as the policy (``AutoModelForCausalLM``), dropout off.

    Args:
        name_or_path, gguf_file: the source (see :func:`resolve_pretrained`).
        dtype: parameter dtype name (``float32``, ``bfloat16``, ``float16``).
        trainable_layers: train only the top N decoder blocks (``None``: all).
        gradient_checkpointing: recompute activations in backward to save memory.
        lora: ``model.lora`` (:class:`~rlhf_lightning.config.schema.LoRASettings` or dict; ``None`` or ``r`` null:
            off): train LoRA adapters only (:func:`~rlhf_lightning.models.lora.apply_lora`).

    Raises:
        FileNotFoundError: the source does not exist. ValueError: unknown dtype; ``trainable_layers`` with
        LoRA; a bad ``lora`` setting.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name_or_path, gguf_file), dtype=_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    return _finish(model, trainable_layers, gradient_checkpointing, lora)


def load_reference(name_or_path: str, gguf_file: str | None = None, dtype: str = "float32",
                   trust_remote_code: bool = False, lora: dict | None = None, **_: object) -> nn.Module | None:
    """The frozen reference policy for the KL penalty: a causal LM, eval mode, no gradients.

    Args:
        lora: PPO's ``model.lora``: when on (``r`` set), the policy is a LoRA model whose adapters switched
            off are the reference, so none is loaded and ``None`` is returned (the value stage's rollout
            policy passes none).
    """
    from transformers import AutoModelForCausalLM

    if lora_settings(lora) is not None:
        log.info("reference: the LoRA policy with its adapters off (no copy loaded)")
        return None

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name_or_path, gguf_file), dtype=_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    return freeze(disable_dropout(model))


def load_scalar_model(name_or_path: str, gguf_file: str | None = None, dtype: str = "float32",
                      trainable_layers: int | None = None, gradient_checkpointing: bool = False,
                      frozen: bool = False, trust_remote_code: bool = False, seed: int = 0,
                      head: str = "keep", lora: dict | None = None, **_: object) -> nn.Module:
    """A backbone with a scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``).

    Used as reward model (head read at the last token) and as critic (head read at every
    token). A head created here (from a plain causal-LM checkpoint) is initialised with
    N(0, 1/(hidden+1)) (Huang et al. 2024, N+ implementation details, detail 3), seeded by
    ``seed``; a head found in the checkpoint (a saved reward model or critic) is kept, unless
    ``head`` says otherwise.

    Args:
        head: ``keep`` (the checkpoint's head, else a new normal one), ``normal`` (always a new
            N(0, 1/(hidden+1)) head) or ``zero`` (weights and bias 0: the model outputs 0
            everywhere until it learns). A critic started from a reward model keeps its backbone
            either way; ``zero`` drops the reward model's head, whose readings at tokens other than
            the last are noise to a critic (PPO's ``critic_head``).
        lora: ``model.lora`` (``None`` or ``r`` null: off): train LoRA adapters and the head only
            (:func:`~rlhf_lightning.models.lora.apply_lora`); ignored with ``frozen``.

    Raises:
        FileNotFoundError: the source does not exist. ValueError: unknown dtype or ``head``.
    """
    if head not in ("keep", "normal", "zero"):
        raise ValueError(f"head={head!r}: expected keep, normal or zero")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_pretrained(name_or_path, gguf_file)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    has_head = _names_scalar_head(config.architectures)
    scalar_model_config(config)
    register_scalar_model(type(config))
    with torch.random.fork_rng(), _load_report_held():
        torch.manual_seed(seed)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, output_loading_info=True)
    _report_unexpected_loading(path, info, expected_missing=() if has_head else SCALAR_HEAD_NAMES)
    if head != "keep" or not has_head:
        init_scalar_head(score_head(model), "zero" if head == "zero" else "normal", seed)
    if frozen:
        return freeze(_finish(model, trainable_layers, gradient_checkpointing))
    return _finish(model, trainable_layers, gradient_checkpointing, lora, head=score_head(model))


class _HoldLoadReport(logging.Filter):
    """Drops transformers' ``LOAD REPORT`` records (its table of missing, unexpected and mismatched keys):
    :func:`_report_unexpected_loading` says in one line what was not expected instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _load_report_held():
    """A context in which transformers' ``LOAD REPORT`` is not printed (:class:`_HoldLoadReport` on
    ``transformers.modeling_utils``'s logger)."""
    from contextlib import contextmanager

    @contextmanager
    def held():
        target = logging.getLogger("transformers.modeling_utils")
        report_filter = _HoldLoadReport()
        target.addFilter(report_filter)
        try:
            yield
        finally:
            target.removeFilter(report_filter)

    return held()


def _report_unexpected_loading(path: str, info: dict, expected_missing: tuple[str, ...] = ()) -> None:
    """Log one warning naming what loading ``path`` did not expect: missing weights other than a scalar head this
    module initialises itself (``expected_missing``: its module names), unexpected and mismatched keys; nothing when
    all is as expected (a causal LM's checkpoint read as a reward model lacks only the head, which is then
    initialised: transformers' table of it looks like an error and is not one)."""
    missing = [k for k in info.get("missing_keys", ()) if k.split(".", 1)[0] not in expected_missing]
    problems = {"missing": missing, "unexpected": list(info.get("unexpected_keys", ())),
                "mismatched": [str(k) for k in info.get("mismatched_keys", ())]}
    said = "; ".join(f"{kind} {', '.join(sorted(keys)[:8])}" + (" ..." if len(keys) > 8 else "")
                     for kind, keys in problems.items() if keys)
    if said:
        log.warning("loading %s: %s", path, said)


def _names_scalar_head(architectures: list[str] | None) -> bool:
    """Whether a config's ``architectures`` name a sequence-classification model (a checkpoint with a trained head)."""
    return any(a.endswith("ForSequenceClassification") for a in (architectures or []))


def init_scalar_head(head: nn.Linear, kind: str, seed: int) -> None:
    """Initialise a new scalar head in place: ``normal`` draws its weight from N(0, 1/(H+1)) (H = its input
    size; Huang et al. 2024, N+ implementation details, detail 3) with a private generator seeded by ``seed``
    (the global RNG is untouched); ``zero`` sets it to 0. The bias, if any, is 0 either way.

    Raises:
        ValueError: ``kind`` is neither ``normal`` nor ``zero``.
    """
    if kind not in ("normal", "zero"):
        raise ValueError(f"init_scalar_head: kind={kind!r}, expected normal or zero")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        if kind == "zero":
            nn.init.zeros_(head.weight)
        else:
            torch.manual_seed(seed)
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def load_critic(adv_estimator: str, share_base: bool = False, **kwargs) -> nn.Module | PolicyBaseCritic | None:
    """The critic of an RLHF stage: :func:`load_scalar_model` with ``kwargs`` when ``adv_estimator`` uses one
    (:data:`rlhf_lightning.algorithms.advantages.CRITIC_ESTIMATORS`), else ``None`` (critic-free estimators load none).

    Args:
        share_base: PPO's ``critic.share_base``: the critic is a second adapter on the LoRA policy's base, built
            when the policy is there (:class:`PolicyBaseCritic`, from :meth:`PolicyBaseCritic.from_source` with
            ``kwargs``); no base model of its own is loaded.

    Raises:
        ValueError: ``share_base`` is not a bool; as :func:`load_scalar_model`, or :meth:`PolicyBaseCritic.from_source`.
    """
    from rlhf_lightning.algorithms.advantages import CRITIC_ESTIMATORS

    if not isinstance(share_base, bool):
        raise ValueError(f"critic.share_base={share_base!r}: expected true or false")
    if adv_estimator not in CRITIC_ESTIMATORS:
        return None
    return PolicyBaseCritic.from_source(**kwargs) if share_base else load_scalar_model(**kwargs)


@dataclass
class PolicyBaseCritic:
    """PPO's critic on the LoRA policy's base (``critic.share_base=true``), before the policy exists: its adapter
    settings, its starting adapter weights and head. :class:`~rlhf_lightning.modules.PPOModule` builds it on its
    policy with :meth:`attach` (:func:`~rlhf_lightning.models.lora.critic_on_policy_base`).

    Attributes:
        source: where the adapter and head come from (``critic_path``), for messages.
        settings: ``model.lora`` (its dropout for the source's adapter; a fresh adapter takes the policy's
            settings, which are ``model.lora`` too).
        head: ``keep`` (the source's head), ``normal`` or ``zero`` (a new one, :func:`init_scalar_head`).
        seed: the new head's seed.
        adapter_config: the source adapter's ``peft.LoraConfig`` (``None``: a fresh adapter from ``settings``).
        adapter_state: the source adapter's tensors, named as the policy names its own adapter's parameters
            without the adapter's name (``model.layers.0.self_attn.q_proj.lora_A.weight``); ``None``: fresh.
        head_state: the source's head (``weight`` (1, H), maybe ``bias``); ``None``: a new head.
    """

    source: str
    settings: LoRASettings
    head: str = "keep"
    seed: int = 0
    adapter_config: object = None  # peft.LoraConfig (peft is imported where it is used)
    adapter_state: dict | None = None
    head_state: dict | None = None

    @classmethod
    def from_source(cls, name_or_path: str, head: str = "keep", seed: int = 0, lora: dict | None = None,
                    **_: object) -> PolicyBaseCritic:
        """Read the critic's adapter and head from ``name_or_path`` (``critic_path``).

        A LoRA export (a reward or value stage run with ``model.lora.r``: ``<name_or_path>_adapter`` beside it)
        gives the adapter and the head. An adapter trained on another LoRA export (a value stage's, on the reward
        model's merged export) is stacked on that export's adapter (rank r₁ + r₂,
        :func:`~rlhf_lightning.models.lora.stacked_adapter`), down to an adapter on a plain base, which must be
        the policy's (:meth:`attach` checks). Any other source gives neither: the critic starts with a fresh
        adapter (B = 0) and a new head, which ``head=keep`` refuses when the source has a trained head (it was
        trained on the source's backbone, which the critic does not use).

        Raises:
            ValueError: ``lora`` is off (``model.lora.r`` null); a source with a trained head but no adapter and
                ``head=keep``; an unknown ``head``.
        """
        if head not in ("keep", "normal", "zero"):
            raise ValueError(f"head={head!r}: expected keep, normal or zero")
        settings = lora_settings(lora)
        if settings is None:
            raise ValueError("critic.share_base=true needs model.lora.r: the critic is a second LoRA adapter on the "
                             "policy's base")
        adapter_dir = Path(str(name_or_path).rstrip("/") + ADAPTER_SUFFIX)
        if (adapter_dir / "adapter_config.json").is_file():
            config, adapter_state, head_state = _read_adapter(adapter_dir)
            sources = [adapter_dir]
            while config.base_model_name_or_path and len(sources) < 8:  # trained on a LoRA export: stack the two
                lower_dir = Path(str(config.base_model_name_or_path).rstrip("/") + ADAPTER_SUFFIX)
                if not (lower_dir / "adapter_config.json").is_file():
                    break
                lower_config, lower_state, _ = _read_adapter(lower_dir)
                config, adapter_state = stacked_adapter(lower_config, lower_state, config, adapter_state)
                sources.append(lower_dir)
            config.lora_dropout = settings.dropout
            log.info("critic.share_base: the critic's adapter (rank %d) and head from %s", config.r,
                     " on ".join(map(str, sources)))
            return cls(str(name_or_path), settings, head, seed, config, adapter_state,
                       head_state if head == "keep" else None)
        if head == "keep" and _has_scalar_head(name_or_path):
            raise ValueError(f"critic.share_base=true: {name_or_path} has a trained head but no LoRA adapter beside it "
                             f"({adapter_dir.name}): its head reads another backbone than the policy's base. Train the "
                             "reward or value stage with model.lora.r, or set critic_head=zero (or normal)")
        return cls(str(name_or_path), settings, head, seed)

    def attach(self, policy: nn.Module) -> nn.Module:
        """Build the critic on ``policy`` (:func:`~rlhf_lightning.models.lora.critic_on_policy_base`), load the
        source's adapter and head, or initialise a new head (``normal`` for ``keep`` without one).

        Raises:
            ValueError: the source's adapter (stacked) was trained on another base than the policy's (its
                recorded ``base_model_name_or_path``); it does not fit the policy (a tensor the policy's adapter
                does not have, or one of its adapter's tensors missing); or as ``critic_on_policy_base``.
        """
        import copy

        if self.adapter_config is not None:
            config = self.adapter_config
            _check_same_base(config.base_model_name_or_path, policy, self.source)
        elif has_lora(policy):  # model.lora: the policy's own settings, hence its layers
            config = copy.deepcopy(policy.peft_config[ADAPTER])
        else:
            config = None  # critic_on_policy_base refuses a policy without LoRA
        critic = critic_on_policy_base(policy, config)
        if self.adapter_state is not None:
            wanted = {name for name, _ in policy.named_parameters() if adapter_name_of(name) == CRITIC_ADAPTER}
            state = {_with_adapter(key, CRITIC_ADAPTER): value for key, value in self.adapter_state.items()}
            extra, missing = sorted(set(state) - wanted), sorted(wanted - set(state))
            if extra or missing:
                raise ValueError(f"critic.share_base: the adapter of {self.source} does not fit the policy "
                                 f"({len(extra)} unknown tensors, e.g. {extra[:1]}; {len(missing)} missing, "
                                 f"e.g. {missing[:1]})")
            policy.load_state_dict(state, strict=False)
        head = score_head(critic)
        if self.head_state is not None:
            head.load_state_dict(self.head_state)
        else:
            init_scalar_head(head, "zero" if self.head == "zero" else "normal", self.seed)
        return critic


def _check_same_base(adapter_base: str | None, policy: nn.Module, source: str) -> None:
    """Refuse an adapter whose recorded base is not the policy's base (paths compared resolved); an adapter that
    records none is taken with a warning."""
    policy_base = base_model_name(policy)
    if not adapter_base:
        log.warning("critic.share_base: the adapter of %s records no base model; it is assumed to be the policy's "
                    "(%s)", source, policy_base)
        return
    a, b = Path(str(adapter_base)), Path(str(policy_base))
    same = a.resolve() == b.resolve() if a.exists() and b.exists() else str(a) == str(b)
    if not same:
        raise ValueError(f"critic.share_base=true: the adapter of {source} was trained on {adapter_base}, not on the "
                         f"policy's base {policy_base}, so it cannot run on it: use a critic_path whose reward/value "
                         "stages started from the policy's base with model.lora.r, or critic_path=<the policy's base> "
                         "for a fresh adapter and head")


def _with_adapter(key: str, adapter: str) -> str:
    """``...q_proj.lora_A.weight`` → ``...q_proj.lora_A.<adapter>.weight`` (how peft names an adapter's tensor)."""
    module, leaf = key.rsplit(".", 1)
    return f"{module}.{adapter}.{leaf}"


def _read_adapter(directory: Path) -> tuple[object, dict, dict | None]:
    """An adapter written by :func:`~rlhf_lightning.models.lora.save_adapter` (or peft): its ``LoraConfig``, its LoRA
    tensors (``base_model.model.`` prefix removed) and its saved head (``score``/``classifier``/``v_head``), if any."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(directory))
    tensors = {key.removeprefix("base_model.model."): value
               for key, value in load_file(directory / "adapter_model.safetensors").items()}
    heads = [name for name in SCALAR_HEAD_NAMES if f"{name}.weight" in tensors]
    head_state = ({key.split(".", 1)[1]: tensors.pop(key) for key in list(tensors) if key.startswith(heads[0] + ".")}
                  if heads else None)
    return config, {k: v for k, v in tensors.items() if ".lora_" in k}, head_state


def _has_scalar_head(name_or_path: str) -> bool:
    """Whether a model source's ``config.json`` names a sequence-classification architecture (a trained head)."""
    config = Path(str(name_or_path)) / "config.json"
    if not config.is_file():
        return False
    return _names_scalar_head(json.loads(config.read_text()).get("architectures"))


def load_reward_model(name_or_path: str | None, **kwargs) -> nn.Module | None:
    """The frozen reward model: :func:`load_scalar_model` (``frozen=True`` unless given) from ``name_or_path``,
    or ``None`` when it is null (PPO's reward then comes from reward functions alone).

    Raises:
        As :func:`load_scalar_model`.
    """
    if name_or_path is None:
        return None
    return load_scalar_model(name_or_path, **{"frozen": True, **kwargs})
