"""Where a response's score comes from besides the reward model: reward functions with TRL's signature
(:mod:`~rlhf_lightning.rewards.functions`) and the built-in verifiers (:mod:`~rlhf_lightning.rewards.verifiers`)."""
