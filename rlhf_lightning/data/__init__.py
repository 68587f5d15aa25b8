"""Data: preference pairs (reward model) and prompts (PPO) from local files or the Hugging Face Hub."""

from rlhf_lightning.data.formats import (
    REASONS,
    DataError,
    DataSourceError,
    DataSourceNotFoundError,
    NoUsableRowError,
    PreferenceExample,
    encode_prompt,
    encode_response,
    extract_prompt,
    hh_text,
    load_examples,
    load_prompts,
    normalize_row,
    parse_hh_dialogue,
    read_rows,
    truncate_pair,
)
from rlhf_lightning.data.preference import PreferenceCollator, PreferenceDataModule
from rlhf_lightning.data.prompts import PromptCollator, PromptDataModule

__all__ = [
    "REASONS", "DataError", "DataSourceError", "DataSourceNotFoundError", "NoUsableRowError", "PreferenceCollator",
    "PreferenceDataModule", "PreferenceExample", "PromptCollator",
    "PromptDataModule", "encode_prompt", "encode_response", "extract_prompt", "hh_text", "load_examples",
    "load_prompts", "normalize_row", "parse_hh_dialogue", "read_rows", "truncate_pair",
]
