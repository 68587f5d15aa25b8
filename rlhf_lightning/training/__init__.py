"""What runs a training job around the LightningModules: ``train.py``'s assembly of a run from the composed config
(:mod:`~rlhf_lightning.training.run`), its checks before anything loads (:mod:`~rlhf_lightning.training.validate`),
process start-up (:mod:`~rlhf_lightning.training.launch`), and the Lightning plug-ins: callbacks, crash-safe
checkpoint files, the resumable CSV logger and W&B tracking."""
