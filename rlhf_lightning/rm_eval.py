"""``python -m rlhf_lightning.rm_eval``: the command of :mod:`rlhf_lightning.evaluation.rm_eval`, kept short."""

from rlhf_lightning.evaluation.rm_eval import main

if __name__ == "__main__":
    main()
