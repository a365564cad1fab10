"""Batching InstructionDataset samples for LavinModel, and counting the tokens trained on."""
from dataclasses import asdict, dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from .dataset import IGNORE_INDEX


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    """Right-pad a list of InstructionDataset samples into one batch.

    Returns dict(input_ids long [B, T] (pad_id after each sample), attention_mask long [B, T]
    (1 = token), labels long [B, T] (-100 on padding), pixel_values float [B_img, 3, H, W] of the
    image samples in batch order, or None when there are none, has_image bool [B], ids list[str]).
    All but `ids` are LavinModel.forward's keyword arguments. Text-only samples get no image row.
    """
    if not samples:
        raise ValueError("samples must hold at least one sample, got an empty list")
    input_ids = [sample["input_ids"] for sample in samples]
    lengths = torch.tensor([len(ids) for ids in input_ids])
    width = int(lengths.max())
    images = []
    for sample in samples:
        if sample["has_image"]:
            if sample["pixel_values"] is None:
                raise ValueError(f"sample {sample['id']!r} has has_image=True but pixel_values "
                                 f"None; expected a [3, H, W] tensor")
            images.append(sample["pixel_values"])
    return {"input_ids": pad_sequence(input_ids, batch_first=True, padding_value=pad_id),
            "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
            "labels": pad_sequence([sample["labels"] for sample in samples], batch_first=True,
                                   padding_value=IGNORE_INDEX),
            "pixel_values": torch.stack(images) if images else None,
            "has_image": torch.tensor([bool(sample["has_image"]) for sample in samples]),
            "ids": [sample["id"] for sample in samples]}


@dataclass
class TokenCounter:
    """Running token totals, to compare mixtures by what they cost.

    text_tokens: real text tokens (attention_mask ones); image_tokens: K per image sample;
    padded_tokens: padding positions; samples_text / samples_image: samples per modality.
    """
    text_tokens: int = 0
    image_tokens: int = 0
    padded_tokens: int = 0
    samples_text: int = 0
    samples_image: int = 0

    def add(self, batch: dict, image_tokens_per_sample: int) -> "TokenCounter":
        """Count one collated batch; image_tokens_per_sample = LavinModel.image_token_count (K)."""
        if image_tokens_per_sample < 0:
            raise ValueError(f"image_tokens_per_sample must be >= 0, got {image_tokens_per_sample}")
        mask = batch["attention_mask"]
        images = int(batch["has_image"].sum())
        self.text_tokens += int(mask.sum())
        self.padded_tokens += int(mask.numel() - mask.sum())
        self.image_tokens += images * int(image_tokens_per_sample)
        self.samples_image += images
        self.samples_text += int(batch["has_image"].numel()) - images
        return self

    def merge(self, other: "TokenCounter") -> "TokenCounter":
        """Add another counter's totals into this one (e.g. from another rank)."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    @property
    def total_tokens(self) -> int:
        """Text + image tokens (what the model attends over, padding excluded)."""
        return self.text_tokens + self.image_tokens

    def as_dict(self) -> dict:
        """The five counts plus total_tokens."""
        return {**asdict(self), "total_tokens": self.total_tokens}
