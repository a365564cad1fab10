"""Tokenized instruction samples with assistant-only labels, images loaded lazily.

The conversation template (templates.py) decides the text; with the default "mlan" one, a
record with turns [(human, q1), (gpt, a1), (human, q2), (gpt, a2)] becomes
    <s> user : q1 assistant : a1 </s> user : q2 assistant : a2 </s>
    labels: -100 on <s> and every "user : ... assistant :" token; the token ids of each answer
    and its </s> on assistant turns (labels[t] = input_ids[t]; the model shifts them).
There is no image placeholder token: LavinModel puts the modality token and the K image tokens
in front of the text itself. The tokenizer may be ours (WordTokenizer) or a HuggingFace
tokenizer or processor (wrapped in HFTokenizer); a processor's image processor, or one given,
preprocesses the images instead of the built-in resize + CLIP normalization.

A huge text value costs what max_length can use: with max_length set, a value longer than
2 * CHARS_PER_TOKEN * max_length characters keeps only its first and last
CHARS_PER_TOKEN * max_length characters before tokenizing (`bound_text`). Every token that
`truncate` can keep lies in those, as long as the tokenizer makes at least one token per
CHARS_PER_TOKEN characters (a tokenizer making fewer keeps fewer tokens, never more memory).
"""
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .records import Record, image_size_problem
from .templates import PROMPT_TEMPLATE, encode_segments, get_template, unknown_template_words
from .tokenizer import as_tokenizer

IGNORE_INDEX = -100
CHARS_PER_TOKEN = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
__all__ = ["IGNORE_INDEX", "PROMPT_TEMPLATE", "InstructionDataset", "bound_text", "load_pixels",
           "prompt_ids", "split_by_modality", "tokenize_turns"]


def bound_text(text: str, max_length: Optional[int]) -> str:
    """`text`, or its first and last CHARS_PER_TOKEN * max_length characters joined by a
    space when it is more than twice that long (module docstring)."""
    if max_length is None or len(text) <= 2 * CHARS_PER_TOKEN * max_length:
        return text
    budget = CHARS_PER_TOKEN * max_length
    return text[:budget] + " " + text[-budget:]


def _bos(tokenizer, template) -> list[int]:
    return [tokenizer.bos_id] if template.bos and tokenizer.bos_id is not None else []


def tokenize_turns(turns: Sequence[tuple[str, str]], tokenizer, template=None
                   ) -> tuple[list[int], list[int]]:
    """(input_ids, labels), both of length T, of one conversation (layout: module doc).
    template: a name of templates.TEMPLATE_NAMES or a template object (None = "auto")."""
    tokenizer = as_tokenizer(tokenizer)
    template = get_template(template, tokenizer)
    ids, is_label = encode_segments(template.segments(turns, tokenizer), tokenizer)
    input_ids = _bos(tokenizer, template) + ids
    labels = [IGNORE_INDEX] * (len(input_ids) - len(ids))
    labels += [token if label else IGNORE_INDEX for token, label in zip(ids, is_label)]
    return input_ids, labels


def prompt_ids(question: str, tokenizer, template=None) -> list[int]:
    """Token ids of the prompt that asks `question` in `template`, as in training (BOS, the
    template's system text, the question, the assistant's cue): what generation continues."""
    tokenizer = as_tokenizer(tokenizer)
    template = get_template(template, tokenizer)
    segments = template.segments([("human", question)], tokenizer, generation_prompt=True)
    return _bos(tokenizer, template) + encode_segments(segments, tokenizer)[0]


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


def load_pixels(path: str, image_size: int, image_processor=None) -> torch.Tensor:
    """Pixels of the image file at `path`: float32 [3, S, S] by `image_pixels`, or
    image_processor(images=RGB image, return_tensors="pt")["pixel_values"][0] when given (a
    HuggingFace image processor: the model's own resize, crop and normalization). An image
    refused by records.image_size_problem (side, aspect; read from the header) is a ValueError
    before anything is decoded."""
    with Image.open(path) as image:
        problem = image_size_problem(*image.size, max_pixels=None)
        if problem is not None:
            raise ValueError(f"image {str(path)!r} is {problem}")
        if image_processor is not None:
            pixels = image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
            return torch.as_tensor(pixels[0], dtype=torch.float32)
        return image_pixels(image, image_size)


class InstructionDataset(Dataset):
    """Records tokenized at construction; images read from disk on each __getitem__.

    sample = dict(id: str, input_ids: long [T], labels: long [T] (-100 = no loss),
                  pixel_values: float32 [3, image_size, image_size] or None (text-only),
                  has_image: bool)
    tokenizer: a WordTokenizer, a HuggingFace tokenizer or a processor (its image processor
    is used unless image_processor is given). template: a name of templates.TEMPLATE_NAMES or a
    template object (None = "auto": the tokenizer's chat template if it has one, else "mlan").
    max_length: cut longer samples (see `truncate`; huge text values are bounded first, module
    docstring); `self.truncated` counts them, `self.answers_truncated` those that lost answer
    tokens. Template words or answer tokens that map to the tokenizer's unknown token are
    counted in `self.unknown_tokens` ({"template": n, "answers": n}) and warned about once, or
    raise ValueError with strict_vocab=True.
    An image that passed loading but cannot be read at __getitem__ does not crash training:
    a warning names the id, pixel_values are zeros and `self.image_errors` is incremented
    (per process: DataLoader workers count in their own copy).
    """

    def __init__(self, records: Sequence[Record], tokenizer, image_size: int = 28,
                 max_length: Optional[int] = None, template=None, image_processor=None,
                 strict_vocab: bool = False):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be None or an int >= 2 (<s> + one answer token), "
                             f"got {max_length!r}")
        self.records = list(records)
        self.tokenizer = as_tokenizer(tokenizer)
        self.template = get_template(template, self.tokenizer)
        self.image_processor = (image_processor if image_processor is not None
                                else getattr(self.tokenizer, "image_processor", None))
        self.image_size = image_size
        self.max_length = max_length
        self.truncated = 0
        self.answers_truncated = 0              # samples that lost answer (label) tokens
        self.image_errors = 0
        self.unknown_tokens = {"template": 0, "answers": 0}
        self.samples = [self._tokenize(record) for record in self.records]
        self._check_vocabulary(strict_vocab)

    def _check_vocabulary(self, strict: bool):
        """Count template words and answer tokens that the tokenizer does not know."""
        unknown_id = getattr(self.tokenizer, "unk_id", None)
        if unknown_id is None:
            return
        words = unknown_template_words(self.template, self.tokenizer)
        answers = sum(int((labels == unknown_id).sum()) for _, labels in self.samples)
        self.unknown_tokens = {"template": len(words), "answers": answers}
        if not words and not answers:
            return
        message = (f"{len(words)} words of template {self.template.name!r} "
                   f"{sorted(set(words))[:8]} and {answers} answer tokens map to the tokenizer's "
                   f"unknown token (the model cannot read or say them)")
        if strict:
            raise ValueError(message + "; pass a tokenizer that covers them or another template")
        warnings.warn(message, stacklevel=3)

    def _tokenize(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        turns = [(role, bound_text(text, self.max_length)) for role, text in record.turns]
        input_ids, labels = tokenize_turns(turns, self.tokenizer, self.template)
        if self.max_length is not None and len(input_ids) > self.max_length:
            answer_tokens = sum(label != IGNORE_INDEX for label in labels)
            input_ids, labels = truncate(input_ids, labels, self.max_length)
            self.truncated += 1
            self.answers_truncated += sum(label != IGNORE_INDEX for label in labels) < answer_tokens
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def _pixels(self, record: Record) -> torch.Tensor:
        try:
            return load_pixels(record.image, self.image_size, self.image_processor)
        except Exception as error:      # PIL raises many types for corrupt files
            self.image_errors += 1
            warnings.warn(f"record {record.id!r}: image {record.image!r} unreadable ({error}); "
                          f"using a zero image", stacklevel=3)
            return torch.zeros(self._pixel_shape())

    def _pixel_shape(self) -> tuple:
        """[3, S, S] of this dataset's images (with an image processor: what it makes of a
        blank image)."""
        if self.image_processor is None:
            return (3, self.image_size, self.image_size)
        blank = Image.new("RGB", (self.image_size, self.image_size))
        return tuple(self.image_processor(images=blank, return_tensors="pt")["pixel_values"][0].shape)

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
