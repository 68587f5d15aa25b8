"""Whether a run can be trusted: the statistics (:mod:`~rlhf_lightning.evaluation.diagnostics`), the held-out
before/after evaluation of PPO and DPO (:mod:`~rlhf_lightning.evaluation.heldout`), and the commands
``python -m rlhf_lightning.rm_eval`` (:mod:`~rlhf_lightning.evaluation.rm_eval`), ``python -m rlhf_lightning.summary``
(:mod:`~rlhf_lightning.evaluation.summary`) and ``python -m rlhf_lightning.report``
(:mod:`~rlhf_lightning.evaluation.report`)."""
