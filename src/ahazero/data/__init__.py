"""Datasets for GRPO: local files and hub datasets, GSM8K, and prompt formatting (chat template, truncation)."""
from ahazero.data.loaders import (
    DATA_SUFFIXES,
    SYSTEM_PROMPT,
    gsm8k_row,
    load_any,
    load_dataset_file,
    load_gsm8k,
)
from ahazero.data.prompts import is_conversational, render_prompt, tokenize_prompts

__all__ = ["DATA_SUFFIXES", "SYSTEM_PROMPT", "gsm8k_row", "is_conversational", "load_any", "load_dataset_file",
           "load_gsm8k", "render_prompt", "tokenize_prompts"]
