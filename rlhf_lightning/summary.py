"""``python -m rlhf_lightning.summary``: the command of :mod:`rlhf_lightning.evaluation.summary`, kept short."""

from rlhf_lightning.evaluation.summary import main

if __name__ == "__main__":
    main()
