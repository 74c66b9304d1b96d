"""Data: corpora -> token blocks for context extension; SFT records -> prompts with masked labels.

- `corpus`: loading documents (files, directories, JSON/JSONL/parquet/CSV records, saved datasets, Hugging Face
  datasets) and SFT records;
- `blocks`: tokenising and cutting the document stream into `context_length` blocks ("concat" / "documents"
  packing), cached as arrow files or streamed;
- `sft`: SFT records -> prompt + answer with the loss on the answer only (prompts rendered by `longlora.prompts`),
  and the padding-free collator.
"""

from ..prompts import DEFAULT_SYSTEM_PROMPT
from .blocks import IGNORE_INDEX, PACKINGS, tokenize_and_block
from .corpus import load_documents, load_sft_records
from .sft import (
    PROMPT_TEMPLATES,
    TRUNCATIONS,
    SFTStats,
    build_sft_dataset,
    build_sft_example,
    sft_collator,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "IGNORE_INDEX", "PACKINGS", "PROMPT_TEMPLATES", "TRUNCATIONS", "SFTStats",
    "build_sft_dataset", "build_sft_example", "load_documents", "load_sft_records", "sft_collator",
    "tokenize_and_block",
]
