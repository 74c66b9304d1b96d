"""`longlora sft`: supervised fine-tuning on long instruction data (LongAlpaca format), the paper's second stage.

Same Trainer setup as `train` (`run_training`); only the data differ: records -> prompt + answer with the loss on
the answer alone, cut in their material when too long, packed without padding. The S2 group size is fixed from
context_length x ratio so that every record trains with the same grouping, whatever its length.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from .config import TrainConfig, check_choice, training_argument_names
from .data import PROMPT_TEMPLATES, TRUNCATIONS

SFT_PACKINGS = ("documents", "pad")


@dataclass
class SFTConfig(TrainConfig):
    """Options of `longlora sft`: those of `train`, plus prompting and length handling."""

    PACKINGS: typing.ClassVar[tuple[str, ...]] = SFT_PACKINGS

    prompt_template: str = "auto"
    """auto (the model's chat template, else llama2) | llama2 | alpaca | chat_template."""
    truncation: str = "material"
    """Records longer than context_length: material (cut the long input, keep the answer) | drop."""
    packing: str = "documents"
    """documents: a batch packed into one padding-free row (position_ids) | pad: padded, length-grouped batches."""

    def __post_init__(self):
        super().__post_init__()
        check_choice("prompt_template", self.prompt_template, PROMPT_TEMPLATES)
        check_choice("truncation", self.truncation, TRUNCATIONS)
        if self.packing == "pad":  # length-grouped batches: less padding (transformers >= 5.24 names it a strategy)
            if "train_sampling_strategy" in training_argument_names():
                self.training_args.setdefault("train_sampling_strategy", "group_by_length")
            else:
                self.training_args.setdefault("group_by_length", True)

    def s2_group_size(self) -> int | None:
        return self.group_size()  # fixed: records of every length share the grouping


def build_sft_data(config: SFTConfig, tokenizer):
    from .data import build_sft_dataset, load_sft_records, sft_collator

    records = load_sft_records(config.data, split=config.split)
    dataset, stats = build_sft_dataset(records, tokenizer, config.context_length, config.prompt_template,
                                       config.truncation, num_proc=config.num_proc)
    print(f"data: {stats}", flush=True)
    if len(dataset) == 0:
        raise ValueError(f"no SFT example fits context_length {config.context_length} ({stats})")
    if config.max_blocks is not None:
        dataset = dataset.select(range(min(config.max_blocks, len(dataset))))
    return dataset, sft_collator(tokenizer, packing=config.packing == "documents")


def cmd_sft(args: list[str] | None = None, **overrides):
    """`longlora sft [CONFIG.yaml] [--key value ...]`."""
    from .config import load_config
    from .train import run_training

    return run_training(load_config(SFTConfig, args, **overrides), build_data=build_sft_data)
