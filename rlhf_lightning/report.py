"""``python -m rlhf_lightning.report``: the command of :mod:`rlhf_lightning.evaluation.report`, kept short."""

from rlhf_lightning.evaluation.report import main

if __name__ == "__main__":
    main()
