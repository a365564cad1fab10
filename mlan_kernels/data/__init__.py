"""Data layer for MLAN mixtures: LLaVA-style records (.json lists or JSONL, image paths confined
to the image folder), a word tokenizer or a HuggingFace one, conversation templates (named, or
the tokenizer's chat template), tokenized samples with assistant-only labels, mixture and
modality/length-grouped batch samplers, collation with token accounting, and a synthetic task
generator. Layering: imports nothing else from mlan_kernels (but the `train` extra check).
"""
from ..requirements import require_extra

require_extra("train", __name__)

from .collate import TokenCounter, collate
from .dataset import (IGNORE_INDEX, PROMPT_TEMPLATE, InstructionDataset, load_pixels, prompt_ids,
                      split_by_modality)
from .inference import Answerer
from .records import LoadReport, Record, find_data_files, load_records, split_records
from .sampler import MixtureSampler, ModalityLengthBatchSampler
from .synthetic import chance_levels, make_synthetic, task_from_id
from .templates import TEMPLATE_NAMES, get_template
from .tokenizer import HFTokenizer, WordTokenizer, as_tokenizer

__all__ = ["Answerer", "HFTokenizer", "IGNORE_INDEX", "PROMPT_TEMPLATE", "InstructionDataset", "LoadReport",
           "MixtureSampler", "ModalityLengthBatchSampler", "Record", "TEMPLATE_NAMES", "TokenCounter",
           "WordTokenizer", "as_tokenizer", "chance_levels", "collate", "find_data_files",
           "get_template", "load_pixels", "load_records", "make_synthetic", "prompt_ids",
           "split_by_modality", "split_records", "task_from_id"]
