"""Rollouts: sampling responses from the policy (:mod:`~rlhf_lightning.rollout.sampler`, or a vLLM engine:
:mod:`~rlhf_lightning.rollout.vllm_engine`) and what the update needs about them
(:mod:`~rlhf_lightning.rollout.experience`)."""
