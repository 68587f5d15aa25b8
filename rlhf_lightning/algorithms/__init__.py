"""The RL math, as plain functions of tensors, tested against hand-computed numbers and naive loops.

- :mod:`~rlhf_lightning.algorithms.ops`: masked reductions, whitening, chunked log-probabilities and entropy,
  sampling from logits;
- :mod:`~rlhf_lightning.algorithms.kl`: KL estimators, the per-token KL-penalised reward, the KL controllers;
- :mod:`~rlhf_lightning.algorithms.advantages`: GAE and the critic-free estimators (GRPO, RLOO, REINFORCE++);
- :mod:`~rlhf_lightning.algorithms.losses`: reward-model, value, PPO policy, KL and DPO losses;
- :mod:`~rlhf_lightning.algorithms.schedules`: learning-rate schedules."""
