"""The settings: the stages' dataclasses with their defaults, ranges and meaning (:mod:`~rlhf_lightning.config.schema`,
the one source of the config reference), and how a source string is read (:mod:`~rlhf_lightning.config.paths`)."""
