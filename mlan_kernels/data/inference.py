"""Answering questions with a trained LavinModel the way it was trained: the prompt built by the
same conversation template (`prompt_ids`), the image preprocessed by the same code or image
processor (`load_pixels`), decoding stopped at the tokenizer's EOS.

    answerer = Answerer(lavin, tokenizer)                   # template / image processor as in training
    answerer.answer("say hello")                            # -> "hello"
    answerer.answer(["what colour is the square ?", "say hello"], images=["red.png", None])

Questions are batched per modality (mlan-train's LLaMA adapters route a batch by its first
sample), prompts of different lengths together (LavinModel.generate left-pads them).
"""
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from .dataset import image_pixels, load_pixels, prompt_ids
from .templates import get_template
from .tokenizer import as_tokenizer


class Answerer:
    """model: a LavinModel (anything with `generate(input_ids, pixel_values, has_image,
    attention_mask=..., eos_token_id=..., max_new_tokens=...)` and a `clip` with
    config.image_size); tokenizer: ours, a HuggingFace tokenizer or processor; template: as in
    InstructionDataset (None = "auto"); image_processor: default the processor's, else the
    built-in resize + CLIP normalization at image_size (default the CLIP's)."""

    def __init__(self, model, tokenizer, template=None, image_processor=None,
                 image_size: Optional[int] = None):
        self.model = model
        self.tokenizer = as_tokenizer(tokenizer)
        self.template = get_template(template, self.tokenizer)
        self.image_processor = (image_processor if image_processor is not None
                                else getattr(self.tokenizer, "image_processor", None))
        self.image_size = image_size or model.clip.config.image_size

    def pixels(self, image) -> torch.Tensor:
        """float32 [3, H, W] of a path or a PIL image, preprocessed as in training."""
        if isinstance(image, Image.Image):
            if self.image_processor is not None:
                return torch.as_tensor(self.image_processor(images=image.convert("RGB"), return_tensors="pt")
                                       ["pixel_values"][0], dtype=torch.float32)
            return image_pixels(image, self.image_size)
        return load_pixels(image, self.image_size, self.image_processor)

    @torch.no_grad()
    def answer(self, questions: Union[str, Sequence[str]], images=None, max_new_tokens: int = 64,
               batch_size: int = 8, **generate_options) -> Union[str, list]:
        """The answer (str) to one question, or a list of answers in order. images: None, or
        one entry per question (None = text-only, a path or a PIL image). generate_options go
        to LavinModel.generate (temperature, top_p, generator, use_cache)."""
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        images = [None] * len(questions) if images is None else ([images] if single else list(images))
        if len(images) != len(questions):
            raise ValueError(f"images must hold one entry per question ({len(questions)}), got {len(images)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        answers = [None] * len(questions)
        groups = ([i for i, image in enumerate(images) if image is None],
                  [i for i, image in enumerate(images) if image is not None])
        was_training = self.model.training
        self.model.eval()
        try:
            for indices in groups:
                for start in range(0, len(indices), batch_size):
                    chosen = indices[start:start + batch_size]
                    texts = self._generate([questions[i] for i in chosen], [images[i] for i in chosen],
                                           max_new_tokens, generate_options)
                    for i, text in zip(chosen, texts):
                        answers[i] = text
        finally:
            self.model.train(was_training)
        return answers[0] if single else answers

    def _generate(self, questions, images, max_new_tokens, options) -> list:
        device = next(self.model.parameters()).device
        prompts = [prompt_ids(question, self.tokenizer, self.template) for question in questions]
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, :len(prompt)] = torch.tensor(prompt)
            attention_mask[row, :len(prompt)] = 1
        has_image = images[0] is not None
        pixel_values = torch.stack([self.pixels(image) for image in images]).to(device) if has_image else None
        tokens = self.model.generate(input_ids.to(device), pixel_values, [has_image] * len(prompts),
                                     attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
                                     eos_token_id=self.tokenizer.eos_id, **options)
        texts = []
        for row in tokens.tolist():
            end = row.index(self.tokenizer.eos_id) if self.tokenizer.eos_id in row else len(row)
            texts.append(self.tokenizer.decode(row[:end]))
        return texts
