"""LoRA adapters on the trained networks (``model.lora``), through ``peft``.

The adapters are injected into the transformers model itself (``peft.inject_adapter_in_model``): the
network keeps its class, its ``forward`` and its layout, so the forward functions
(:mod:`rlhf_lightning.models.forward`), the scalar head and the shared frozen trunk
(:mod:`rlhf_lightning.models.trunk`) work on it unchanged. Every weight of the base model is frozen;
the adapters (and a scalar model's head) train. With a LoRA policy, PPO's reference is the same module
run with its adapters switched off (:func:`adapters_disabled`), so it costs no memory.

With ``critic.share_base``, PPO's critic is a second adapter (:data:`CRITIC_ADAPTER`) on the policy's own
base plus its trainable head (:func:`critic_on_policy_base`): one base model in memory for the policy, the
reference and the critic. Each network runs with its own adapter active (:func:`own_adapter_active`) and
trains its own parameters only (:func:`own_parameters`).

Exports write the merged model (:func:`merged_named_weights`, loadable by plain transformers) and the
adapter beside it (``<export>_adapter``, loadable by ``peft.PeftModel.from_pretrained``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.config.schema import LoRASettings, as_config
from rlhf_lightning.models.parts import decoder_layers, register_scalar_model, scalar_model_config, score_head
from rlhf_lightning.models.sharding import plain_class

log = logging.getLogger(__name__)

#: The adapter's name inside peft's layers (peft's default).
ADAPTER = "default"
#: The adapter of a critic on the policy's base (``critic.share_base``), beside the policy's :data:`ADAPTER`.
CRITIC_ADAPTER = "critic"
#: Suffix of the adapter directory written beside an export (``<run dir>/model`` → ``<run dir>/model_adapter``).
ADAPTER_SUFFIX = "_adapter"


def lora_settings(value: LoRASettings | dict | None) -> LoRASettings | None:
    """``model.lora`` as :class:`~rlhf_lightning.config.schema.LoRASettings`, or ``None`` when it is null or ``r`` is
    null.

    Raises:
        TypeError, ValueError: a bad setting (one line naming ``model.lora.<key>``).
    """
    if value is None:
        return None
    settings = as_config(LoRASettings, value, "model.lora")
    return settings if settings.enabled else None


def base_model_name(model: nn.Module) -> str | None:
    """Where ``model`` was loaded from (``name_or_path``, else its config's): what an adapter records as its base."""
    return getattr(model, "name_or_path", None) or model.config._name_or_path


def adapter_of(model: nn.Module) -> str:
    """The name of the adapter ``model`` runs with: :data:`CRITIC_ADAPTER` for a critic on the policy's base
    (:func:`critic_on_policy_base`), else :data:`ADAPTER`."""
    return getattr(model, "lora_adapter", ADAPTER)


def has_lora(model: nn.Module | None) -> bool:
    """Whether ``model`` carries its LoRA adapter (:func:`apply_lora`, :func:`critic_on_policy_base`)."""
    return model is not None and adapter_of(model) in (getattr(model, "peft_config", None) or {})


def adapter_name_of(parameter_name: str) -> str | None:
    """The adapter a parameter belongs to (``...q_proj.lora_A.critic.weight`` → ``critic``), else ``None``."""
    if ".lora_" not in parameter_name:
        return None
    return parameter_name.split(".lora_", 1)[1].split(".")[1]


def own_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``model`` trains: those requiring a gradient, less the adapters of other networks that share
    its base (a policy's list leaves out the critic's adapter of :func:`critic_on_policy_base`, the critic's leaves out
    the policy's). Each optimizer takes its network's own list, so none steps another network's parameters."""
    name = adapter_of(model)
    return [param for key, param in model.named_parameters()
            if param.requires_grad and adapter_name_of(key) in (None, name)]


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def _requires_grad_kept(layers: list[nn.Module]) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` in ``layers`` on exit: peft's ``set_adapter`` and
    ``enable_adapters`` set it (the active adapter trainable, the others frozen), which would take an adapter out
    of its optimizer's gradients."""
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _set_active_adapter(layers: list[nn.Module], name: str | list[str]) -> None:
    """Make ``name`` the active adapter of ``layers`` without changing any ``requires_grad``."""
    with _requires_grad_kept(layers):
        for layer in layers:
            layer.set_adapter(name)


@contextmanager
def _adapter_during(layers: list[nn.Module], names: list[str]) -> Iterator[None]:
    """``names`` active in ``layers`` inside, the adapter active before on exit (nothing done when they agree)."""
    before = list(layers[0].active_adapters)
    if before == names:
        yield
        return
    _set_active_adapter(layers, names)
    try:
        yield
    finally:
        _set_active_adapter(layers, before)


def _scaling(config) -> float:
    """peft's LoRA scale of a config: alpha / r (alpha / √r with rsLoRA)."""
    return config.lora_alpha / (config.r ** 0.5 if getattr(config, "use_rslora", False) else config.r)


def stacked_adapter(lower, lower_state: dict[str, torch.Tensor], upper, upper_state: dict[str, torch.Tensor]):
    """One adapter computing two stacked ones: ``upper`` trained on a model that is a base plus ``lower`` (merged).

    Each layer's weight is then W + s₁·B₁A₁ + s₂·B₂A₂ = W + B·A with A = [A₁; A₂] ((r₁ + r₂) × in) and
    B = [s₁·B₁, s₂·B₂] (out × (r₁ + r₂)): a rank r₁ + r₂ adapter with scale 1 (``lora_alpha`` = r), exact up to
    the rounding of the merge the upper adapter was trained on. A layer adapted by one of the two gets zeros for
    the other's rows and columns.

    Args:
        lower, upper: the adapters' ``peft.LoraConfig`` (``target_modules`` full layer names, as :func:`apply_lora`
            writes them).
        lower_state, upper_state: their tensors, ``<layer>.lora_A.weight`` (r × in) and ``<layer>.lora_B.weight``
            (out × r), float.

    Returns:
        ``(config, state)``: the stacked adapter's ``LoraConfig`` (``upper``'s, with r = r₁ + r₂, alpha = r, the
        union of the target layers, ``lower``'s base model) and its tensors named as the inputs.

    Raises:
        ValueError: a config with per-layer ranks or scales (``rank_pattern``/``alpha_pattern``), or a layer whose
            A or B is missing.
    """
    for config in (lower, upper):
        if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
            raise ValueError("stacked_adapter: adapters with per-layer ranks or scales (rank_pattern/alpha_pattern) "
                             "are not stacked")
    layers = sorted({key.rsplit(".lora_", 1)[0] for key in [*lower_state, *upper_state]})
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        pairs = [(config, tensors.get(f"{layer}.lora_A.weight"), tensors.get(f"{layer}.lora_B.weight"))
                 for config, tensors in ((lower, lower_state), (upper, upper_state))]
        if any((a is None) != (b is None) for _, a, b in pairs):
            raise ValueError(f"stacked_adapter: {layer} has lora_A without lora_B or the reverse")
        like_a, like_b = next((a, b) for _, a, b in pairs if a is not None)
        parts_a, parts_b = [], []
        for config, a, b in pairs:
            if a is None:  # a layer of the other adapter only: zeros of this one's rank
                a, b = like_a.new_zeros(config.r, like_a.shape[1]), like_b.new_zeros(like_b.shape[0], config.r)
            parts_a.append(a)
            parts_b.append(b * _scaling(config))
        state[f"{layer}.lora_A.weight"] = torch.cat(parts_a, 0)
        state[f"{layer}.lora_B.weight"] = torch.cat(parts_b, 1)
    config = copy.deepcopy(upper)
    config.r = lower.r + upper.r
    config.lora_alpha = config.r
    config.use_rslora = False
    config.target_modules = sorted(set(lower.target_modules) | set(upper.target_modules))
    config.base_model_name_or_path = lower.base_model_name_or_path
    return config, state


def recompute_with_forward_adapter(model: nn.Module) -> None:
    """Make ``model``'s gradient checkpointing recompute each block with the adapter that was active in its forward.

    With two adapters on one base (:func:`critic_on_policy_base`) the backward runs after the critic's forward has
    switched the policy's adapter back on, so a plain recomputation would run the critic's blocks with the policy's
    adapter. The non-reentrant ``torch.utils.checkpoint`` takes a ``context_fn`` called at each checkpointed forward;
    ours records the active adapter there and returns a recomputation context that makes it active again.
    A model without gradient checkpointing is left as it is.
    """
    if not getattr(model, "is_gradient_checkpointing", False):
        return
    layers = _lora_layers(model)

    def context_fn():
        return contextlib.nullcontext(), _adapter_during(layers, list(layers[0].active_adapters))

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": context_fn})


@contextmanager
def own_adapter_active(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its own adapter (:func:`adapter_of`) active, then make the adapter active before (the
    policy's :data:`ADAPTER`) active again. A network that runs with :data:`ADAPTER` (every network but a critic
    on the policy's base) runs unchanged.

    Autograd keeps the tensors each forward used, so a backward after the switch back is the right one; a
    recomputing backward (gradient checkpointing) recomputes with the forward's adapter
    (:func:`recompute_with_forward_adapter`, set by :func:`critic_on_policy_base`).
    """
    name = adapter_of(model)
    if name == ADAPTER:
        yield model
        return
    with _adapter_during(_lora_layers(model), [name]):
        yield model


def target_module_names(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Full names of the linear layers that get an adapter: every ``nn.Linear`` of the decoder blocks (or those
    whose last name part is in ``settings.target_modules``), in the top ``settings.layers`` blocks only.

    Raises:
        ValueError: no decoder blocks; a name of ``target_modules`` matches no linear layer of the blocks.
    """
    blocks = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    first = max(len(blocks) - settings.layers, 0) if settings.layers else 0
    wanted = set(settings.target_modules) if settings.target_modules is not None else None
    names, seen = [], set()
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            seen.add(leaf)
            if index >= first and (wanted is None or leaf in wanted):
                names.append(f"{prefix}.{index}.{name}")
    missing = sorted((wanted or set()) - seen)
    if missing:
        raise ValueError(f"model.lora.target_modules: no linear layer named {', '.join(missing)} in the blocks of "
                         f"{type(model).__name__} (there: {', '.join(sorted(seen))})")
    return names


def apply_lora(model: nn.Module, settings: LoRASettings, head: nn.Module | None = None) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place (``peft.inject_adapter_in_model``) and freeze the rest.

    The adapters' B matrices start at 0 (peft's initialisation), so the model computes what it computed
    before. Their dropout is ``settings.dropout`` (an identity at 0); the model's own dropout stays off.

    Args:
        model: a transformers decoder (causal LM or sequence-classification model), dropout already off.
        settings: the adapters (:class:`~rlhf_lightning.config.schema.LoRASettings`, ``r`` set).
        head: a module trained in full beside the adapters (a scalar model's ``score`` head).

    Returns:
        The same model, its class unchanged; only the adapters (and ``head``) require gradients.

    Raises:
        ValueError: ``settings.r`` is null; the target layers cannot be found (:func:`target_module_names`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not settings.enabled:
        raise ValueError("apply_lora: model.lora.r is null (LoRA off)")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=target_module_names(model, settings))
    config.base_model_name_or_path = base_model_name(model)
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    if head is not None:
        head.requires_grad_(True)
    return model


def critic_on_policy_base(policy: nn.Module, config) -> nn.Module:
    """A critic on the LoRA policy's own base (``critic.share_base``): a second adapter (:data:`CRITIC_ADAPTER`,
    ``config``) injected into the policy's layers and a scalar model whose backbone is the policy's backbone
    (the same module: no weight is copied) with a head of its own.

    The critic runs with its adapter active (:func:`own_adapter_active`, which the forward functions of
    :mod:`rlhf_lightning.models.forward` enter), the policy with :data:`ADAPTER`, the reference with both off
    (:func:`adapters_disabled`); each trains its own parameters (:func:`own_parameters`). Its adapter starts at
    B = 0 (the critic's backbone computes the base model's hidden states); the caller loads a trained adapter
    and sets the head (:class:`~rlhf_lightning.models.builders.PolicyBaseCritic`).

    Args:
        policy: a causal LM with LoRA adapters (:func:`apply_lora`).
        config: the critic adapter's ``peft.LoraConfig`` (target layers named as in the policy).

    Returns:
        The critic: an ``AutoModelForSequenceClassification`` class of the policy's family (``num_labels=1``),
        its head (weight (1, H), and a bias where the class has one) in the policy's dtype and device,
        uninitialised, requiring a gradient.

    Raises:
        ValueError: the policy has no LoRA adapter, or already a critic adapter; its family's scalar model keeps
            its backbone under another name.
    """
    import warnings

    from peft import inject_adapter_in_model

    if not has_lora(policy):
        raise ValueError("critic.share_base: the policy has no LoRA adapter to share its base with (model.lora.r)")
    if CRITIC_ADAPTER in policy.peft_config:
        raise ValueError(f"critic.share_base: the policy already carries a {CRITIC_ADAPTER!r} adapter")
    scalar_config = scalar_model_config(copy.deepcopy(policy.config))
    with torch.device("meta"):
        critic = register_scalar_model(type(policy.config))(scalar_config)
    prefix = policy.base_model_prefix
    if critic.base_model_prefix != prefix:
        raise ValueError(f"critic.share_base: {type(critic).__name__} keeps its backbone as "
                         f"{critic.base_model_prefix!r}, {type(policy).__name__} as {prefix!r}")
    setattr(critic, prefix, getattr(policy, prefix))
    meta_head = score_head(critic)
    head_name = next(name for name, child in critic.named_children() if child is meta_head)
    weight = policy.get_input_embeddings().weight
    setattr(critic, head_name, nn.Linear(meta_head.in_features, meta_head.out_features, bias=meta_head.bias is not None,
                                         dtype=weight.dtype, device=weight.device))
    with warnings.catch_warnings():  # peft warns that the model gets a second adapter: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, policy, adapter_name=CRITIC_ADAPTER)
    for name, param in policy.named_parameters():
        if adapter_name_of(name) == CRITIC_ADAPTER:
            param.requires_grad_(True)
    _set_active_adapter(_lora_layers(policy), ADAPTER)  # peft made the new adapter the active one
    recompute_with_forward_adapter(policy)
    critic.peft_config = policy.peft_config
    critic.lora_adapter = CRITIC_ADAPTER
    critic.train(policy.training)
    return critic


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its LoRA adapters switched off: inside, it computes the base model's outputs.

    Every parameter's ``requires_grad`` is restored on exit (peft's ``enable_adapters`` sets it on the
    adapters it switches on and off), so the optimizers' parameters keep training. A model without
    adapters runs unchanged.

    Yields:
        The model.
    """
    layers = _lora_layers(model)
    with _requires_grad_kept(layers):
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield model
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def _delta_from_state(module: nn.Module, name: str, adapter: str, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """``peft``'s ``get_delta_weight`` of the LoRA layer ``module`` (named ``name``) computed from ``state_dict``'s
    tensors instead of the layer's own: (B·A, transposed for ``fan_in_fan_out`` layers) × the adapter's scale."""
    b = state_dict[f"{name}.lora_B.{adapter}.weight"]
    a = state_dict[f"{name}.lora_A.{adapter}.weight"]
    delta = b.float() @ a.float() if b.dtype in (torch.float16, torch.bfloat16) else b @ a
    delta = delta.T if getattr(module, "fan_in_fan_out", False) else delta
    return (delta * module.scaling[adapter]).to(b.dtype)


@torch.no_grad()
def merged_named_weights(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of ``model`` with its adapters merged in, as ``(name, tensor)`` pairs named as in the plain
    transformers model (what a generation engine such as vLLM loads, or ``save_pretrained`` writes).

    An adapted linear layer's weight is W + (alpha / r)·B·A (``peft``'s ``get_delta_weight``) of the model's own
    adapter (:func:`adapter_of`); the adapters' own tensors are left out. A model without adapters gives its
    ``state_dict`` as it is. The tensors are new for the merged layers and the model's own (detached) for the
    rest: do not modify them in place.

    Args:
        state_dict: the model's whole weights to merge instead of its own (a sharded model's, gathered with
            :func:`~rlhf_lightning.training.fsdp2.full_state_dict`): the layers give only their names and scales.

    Yields:
        ``(name, tensor)`` for every entry of the plain model's ``state_dict``.
    """
    from peft.tuners.lora import LoraLayer

    adapter = adapter_of(model)
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and adapter in module.lora_A]
    if state_dict is None:
        deltas = {f"{name}.base_layer.weight": module.get_delta_weight(adapter) for name, module in layers}
    else:
        deltas = {f"{name}.base_layer.weight": _delta_from_state(module, name, adapter, state_dict)
                  for name, module in layers}
    for key, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        if ".lora_" in key:
            continue
        if key in deltas:
            tensor = tensor + deltas[key].to(tensor.dtype)
        yield key.replace(".base_layer.", "."), tensor


def merged_model(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain transformers model (same class, no adapters) holding :func:`merged_named_weights` of ``model``
    (of ``state_dict``, the model's whole weights, when given).

    Built on the meta device and filled by assignment, so it costs only the merged layers' new tensors; tied
    weights (``tie_word_embeddings``) are tied again. For export (its non-persistent buffers stay on the meta device:
    do not run it).
    """
    with torch.device("meta"):
        plain = plain_class(model)(copy.deepcopy(model.config))
    plain.load_state_dict(dict(merged_named_weights(model, state_dict)), strict=True, assign=True)
    plain.tie_weights()  # a gathered state dict holds tied weights as separate copies: one tensor again
    return plain


def save_adapter(model: nn.Module, directory: str | Path, head_names: tuple[str, ...] = (),
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter of ``model`` as ``peft`` does: ``adapter_config.json`` and ``adapter_model.safetensors``
    (keys ``base_model.model.<name>``), loadable with ``peft.PeftModel.from_pretrained(base_model, directory)``.

    Args:
        head_names: modules trained in full beside the adapters (a scalar model's ``score``): listed in the
            config's ``modules_to_save`` and their weights saved with the adapter.
        state_dict: the model's whole weights to take the adapter and heads from instead of its own (a sharded
            model's, gathered with :func:`~rlhf_lightning.training.fsdp2.full_state_dict`).

    Raises:
        ValueError: the model has no adapter.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not has_lora(model):
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRA adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter = adapter_of(model)
    state = dict(get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter))
    for head in head_names:
        head_state = (getattr(model, head).state_dict() if state_dict is None else
                      {k[len(head) + 1:]: v for k, v in state_dict.items() if k.startswith(head + ".")})
        for name, tensor in head_state.items():
            state[f"{head}.{name}"] = tensor
    save_file({f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()},
              directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[adapter])
    config.modules_to_save = list(head_names) or None
    if head_names:
        config.task_type = "SEQ_CLS"
    elif getattr(model, "get_output_embeddings", lambda: None)() is not None:
        config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    config.save_pretrained(directory)
    return directory


def save_lora_export(model: nn.Module, directory: str | Path, head_names: tuple[str, ...] = (),
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a LoRA network's export: the merged model to ``directory`` (``save_pretrained``) and its adapter to
    ``<directory>_adapter`` (:func:`save_adapter`), from ``state_dict`` (its whole weights) when given. Returns the
    adapter's directory."""
    merged_model(model, state_dict).save_pretrained(directory, safe_serialization=True)
    adapter_dir = Path(str(directory).rstrip("/") + ADAPTER_SUFFIX)
    save_adapter(model, adapter_dir, head_names, state_dict)
    meta = {"merged_model": str(directory), "r": model.peft_config[adapter_of(model)].r}
    (adapter_dir / "rlhf_lightning.json").write_text(json.dumps(meta) + "\n")
    return adapter_dir


def trainable_state_keys(model: nn.Module) -> set[str]:
    """Names (``state_dict`` keys, no prefix) of the parameters ``model`` trains (:func:`own_parameters`)."""
    own = {id(param) for param in own_parameters(model)}
    return {name for name, param in model.named_parameters() if id(param) in own}


def network_memory(model: nn.Module, seen: set[int] | None = None) -> dict[str, int]:
    """Size of a network: ``parameters`` and ``trainable`` (counts) and ``bytes`` of its weights and
    buffers, each storage counted once (tied weights share storage). A network sharded with FSDP2 (``DTensor``
    parameters): the whole network's counts, and the bytes this rank holds (its shards).

    Args:
        seen: storages already counted (by another network that shares them: the policy's base under a critic
            on it), left out of ``bytes`` and added to.
    """
    seen = set() if seen is None else seen
    total = trainable = size = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this rank's shard
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            size += tensor.untyped_storage().nbytes() if tensor.device.type != "meta" else 0
    return {"parameters": total, "trainable": trainable, "bytes": size}


def log_network_memory(networks: dict[str, nn.Module | None], aliases: dict[str, str] | None = None) -> dict:
    """Log one line per network at fit start: parameters, trainable parameters, bytes of weights.

    Args:
        networks: name → network (``None`` entries are left out); weights that a network shares with one
            before it (a critic on the policy's base) count for the first one only.
        aliases: name → a note for a network that is another one seen differently (PPO's reference as the
            LoRA policy with its adapter off): logged with 0 bytes of its own.

    Returns:
        name → :func:`network_memory` (aliases: ``{"bytes": 0}``).
    """
    out: dict[str, dict] = {}
    seen: set[int] = set()
    for name, model in networks.items():
        if model is None:
            continue
        out[name] = stats = network_memory(model, seen)
        lora = f", LoRA r={model.peft_config[adapter_of(model)].r}" if has_lora(model) else ""
        lora += " on the policy's base" if adapter_of(model) == CRITIC_ADAPTER else ""
        log.info("%s: %.1fM parameters, %.2fM trainable%s, %.0f MiB of weights", name, stats["parameters"] / 1e6,
                 stats["trainable"] / 1e6, lora, stats["bytes"] / 2**20)
    for name, note in (aliases or {}).items():
        out[name] = {"bytes": 0}
        log.info("%s: %s, 0 MiB of its own", name, note)
    return out
