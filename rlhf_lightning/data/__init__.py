"""Data: preference pairs (reward model) and prompts (PPO) from local files or the Hugging Face Hub.

Modules: :mod:`~rlhf_lightning.data.rows` (row layouts, :class:`DataError`), :mod:`~rlhf_lightning.data.sources`
(files, directories, Hub datasets), :mod:`~rlhf_lightning.data.tokenization` (chat template, token ids,
truncation), and the data modules :mod:`~rlhf_lightning.data.preference` and :mod:`~rlhf_lightning.data.prompts`.
"""

from rlhf_lightning.data.preference import (
    DPOCollator,
    DPODataModule,
    PreferenceCollator,
    PreferenceDataModule,
    pair_key,
)
from rlhf_lightning.data.prompts import PromptCollator, PromptDataModule
from rlhf_lightning.data.rows import (
    REASONS,
    DataError,
    PreferenceExample,
    extract_prompt,
    normalize_row,
    parse_hh_dialogue,
    prompt_columns,
)
from rlhf_lightning.data.sources import (
    DataSourceError,
    DataSourceNotFoundError,
    NoUsableRowError,
    load_examples,
    load_prompt_rows,
    load_prompts,
    read_rows,
)
from rlhf_lightning.data.tokenization import encode_prompt, encode_response, hh_text, truncate_pair

__all__ = [
    "REASONS", "DPOCollator", "DPODataModule", "DataError", "DataSourceError", "DataSourceNotFoundError",
    "NoUsableRowError", "PreferenceCollator",
    "PreferenceDataModule", "PreferenceExample", "PromptCollator",
    "PromptDataModule", "encode_prompt", "encode_response", "extract_prompt", "hh_text", "load_examples",
    "load_prompt_rows", "load_prompts", "normalize_row", "parse_hh_dialogue", "prompt_columns", "read_rows",
    "pair_key", "truncate_pair",
]
