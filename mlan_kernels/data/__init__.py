"""Data layer for MLAN mixtures: LLaVA-style records, a word tokenizer, tokenized samples with
assistant-only labels, mixture and modality/length-grouped batch samplers, collation with token
accounting, and a synthetic task generator. Layering: imports nothing else from mlan_kernels (but the `train` extra check).
"""
from ..requirements import require_extra

require_extra("train", __name__)

from .collate import TokenCounter, collate
from .dataset import IGNORE_INDEX, PROMPT_TEMPLATE, InstructionDataset, split_by_modality
from .records import LoadReport, Record, load_records
from .sampler import MixtureSampler, ModalityLengthBatchSampler
from .synthetic import chance_levels, make_synthetic, task_from_id
from .tokenizer import WordTokenizer

__all__ = ["IGNORE_INDEX", "PROMPT_TEMPLATE", "InstructionDataset", "LoadReport",
           "MixtureSampler", "ModalityLengthBatchSampler", "Record", "TokenCounter",
           "WordTokenizer", "chance_levels", "collate", "load_records", "make_synthetic",
           "split_by_modality", "task_from_id"]
