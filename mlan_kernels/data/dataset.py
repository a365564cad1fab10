"""Tokenized instruction samples with assistant-only labels, images loaded lazily.

Prompt template (PROMPT_TEMPLATE / ANSWER_TEMPLATE), for a record with turns
[(human, q1), (gpt, a1), (human, q2), (gpt, a2)]:
    <s> user : q1 assistant : a1 </s> user : q2 assistant : a2 </s>
    labels: -100 on <s> and every "user : ... assistant :" token; the token ids of each answer
    and its </s> on assistant turns (labels[t] = input_ids[t]; the model shifts them).
There is no image placeholder token: LavinModel puts the modality token and the K image tokens
in front of the text itself.
"""
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .records import Record
from .tokenizer import WordTokenizer

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "user : {human} assistant :"
ANSWER_TEMPLATE = "{gpt}"                                    # followed by </s>
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tokenize_turns(turns: Sequence[tuple[str, str]], tokenizer: WordTokenizer
                   ) -> tuple[list[int], list[int]]:
    """(input_ids, labels), both of length T, of one conversation (layout: module doc)."""
    input_ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for role, text in turns:
        if role == "human":
            ids = tokenizer.encode(PROMPT_TEMPLATE.format(human=text))
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        elif role == "gpt":
            ids = tokenizer.encode(ANSWER_TEMPLATE.format(gpt=text)) + [tokenizer.eos_id]
            input_ids += ids
            labels += ids
        else:
            raise ValueError(f'turn role must be "human" or "gpt", got {role!r}')
    return input_ids, labels


def truncate(input_ids: list[int], labels: list[int], max_length: int
             ) -> tuple[list[int], list[int]]:
    """Cut to max_length tokens from the right. If that would leave no label, keep <s>, the
    prompt tokens just before the first label and that label instead (cut from the left)."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    if any(label != IGNORE_INDEX for label in labels[:max_length]):
        return input_ids[:max_length], labels[:max_length]
    first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    start = first + 2 - max_length
    return input_ids[:1] + input_ids[start:first + 1], labels[:1] + labels[start:first + 1]


def image_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB image resized to image_size², scaled to [0, 1], CLIP-normalized: float32 [3, S, S]."""
    image = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0                        # [S, S, 3]
    pixels = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def load_pixels(path: str, image_size: int) -> torch.Tensor:
    """`image_pixels` of the image file at `path`: float32 [3, S, S]."""
    with Image.open(path) as image:
        return image_pixels(image, image_size)


class InstructionDataset(Dataset):
    """Records tokenized at construction; images read from disk on each __getitem__.

    sample = dict(id: str, input_ids: long [T], labels: long [T] (-100 = no loss),
                  pixel_values: float32 [3, image_size, image_size] or None (text-only),
                  has_image: bool)
    max_length: cut longer samples (see `truncate`); `self.truncated` counts them,
    `self.answers_truncated` those that lost answer tokens.
    An image that passed loading but cannot be read at __getitem__ does not crash training:
    a warning names the id, pixel_values are zeros and `self.image_errors` is incremented
    (per process: DataLoader workers count in their own copy).
    """

    def __init__(self, records: Sequence[Record], tokenizer: WordTokenizer, image_size: int = 28,
                 max_length: Optional[int] = None):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be None or an int >= 2 (<s> + one answer token), "
                             f"got {max_length!r}")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_length = max_length
        self.truncated = 0
        self.answers_truncated = 0              # samples that lost answer (label) tokens
        self.image_errors = 0
        self.samples = [self._tokenize(record) for record in self.records]

    def _tokenize(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = tokenize_turns(record.turns, self.tokenizer)
        if self.max_length is not None and len(input_ids) > self.max_length:
            answer_tokens = sum(label != IGNORE_INDEX for label in labels)
            input_ids, labels = truncate(input_ids, labels, self.max_length)
            self.truncated += 1
            self.answers_truncated += sum(label != IGNORE_INDEX for label in labels) < answer_tokens
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def _pixels(self, record: Record) -> torch.Tensor:
        try:
            return load_pixels(record.image, self.image_size)
        except Exception as error:      # PIL raises many types for corrupt files
            self.image_errors += 1
            warnings.warn(f"record {record.id!r}: image {record.image!r} unreadable ({error}); "
                          f"using a zero image", stacklevel=3)
            return torch.zeros(3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        input_ids, labels = self.samples[index]
        return {"id": record.id, "input_ids": input_ids, "labels": labels,
                "pixel_values": self._pixels(record) if record.has_image else None,
                "has_image": record.has_image}

    @property
    def lengths(self) -> list[int]:
        """Text token count T of each sample (no image loading)."""
        return [len(input_ids) for input_ids, _ in self.samples]

    @property
    def has_image(self) -> list[bool]:
        return [record.has_image for record in self.records]


def split_by_modality(dataset: InstructionDataset) -> tuple[list[int], list[int]]:
    """(indices of text-only samples, indices of image-text samples), each ascending."""
    text, image = [], []
    for index, has_image in enumerate(dataset.has_image):
        (image if has_image else text).append(index)
    return text, image
