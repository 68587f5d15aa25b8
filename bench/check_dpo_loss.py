"""Check: our DPO loss and implicit rewards against TRL 1.16's DPOTrainer on the same batch (tiny model).

    # in the trl 1.16 venv (bench/README.md, "DPO"), from the repository root
    PYTHONPATH=. python bench/check_dpo_loss.py

Both sides read the same 4 hh-rlhf pairs (our token ids; TRL's own tokenization is skipped), the same policy
(randomly perturbed so that it differs from the reference) and the same reference. TRL's loss is its
``compute_loss`` on its collator's batch; ours is :func:`rlhf_lightning.algorithms.losses.dpo_loss` of
``DPOModule.sequence_logps`` (IPO: per-token means). Prints both per loss type and exits 1 on a mismatch.
TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (cDPO is not in it), so the check runs at ε = 0.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_step import hh_pairs  # noqa: E402

BETA = 0.3


def main() -> int:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf_lightning.algorithms.losses import dpo_loss
    from rlhf_lightning.data import DPOCollator
    from rlhf_lightning.models import TINY, load_policy, load_reference, load_tokenizer
    from rlhf_lightning.modules import DPOModule

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    tokenizer = load_tokenizer(TINY)
    pairs = hh_pairs(tokenizer)
    policy, reference = load_policy(TINY), load_reference(TINY)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]
    batch = DPOCollator(tokenizer.pad_token_id)(pairs)
    n = len(pairs)
    with torch.no_grad():
        logps, lengths = DPOModule.sequence_logps(policy, batch)
        ref, _ = DPOModule.sequence_logps(reference, batch)
    failed = False
    for loss_type in ("sigmoid", "ipo", "hinge"):
        config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="check-trl-dpo-"), beta=BETA, loss_type=[loss_type],
                           max_length=None, bf16=False, use_cpu=True, report_to="none", disable_tqdm=True)
        trainer = PretokenizedDPOTrainer(model=policy, ref_model=reference, args=config,
                                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        policy.train()
        with torch.no_grad():
            theirs = trainer.compute_loss(policy, trainer.data_collator(rows)).item()
        pol, rf = (logps / lengths, ref / lengths) if loss_type == "ipo" else (logps, ref)
        ours = dpo_loss(pol[:n], pol[n:], rf[:n], rf[n:], BETA, loss_type)[0].mean().item()
        ok = abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))
        failed |= not ok
        print(f"{loss_type:8s} ours {ours:.6f}  TRL {theirs:.6f}  {'ok' if ok else 'MISMATCH'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
