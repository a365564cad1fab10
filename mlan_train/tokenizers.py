"""Tokenizer choice of the training program: our in-code WordTokenizer (synthetic data), or a
local HuggingFace tokenizer (the --llama checkpoint's), behind the same small interface:
encode(text) -> ids (no special tokens), decode(ids), vocab_size, pad_id, bos_id, eos_id."""
import os

from mlan_kernels.data.tokenizer import WordTokenizer


class HFTokenizer:
    """A transformers tokenizer (loaded from a local directory, no download) as above.
    pad_id falls back to 0 (LLaMA has none; padded positions are masked anyway)."""

    def __init__(self, path):
        from transformers import AutoTokenizer
        self.inner = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bos_id, self.eos_id = self.inner.bos_token_id, self.inner.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer at {path} needs bos and eos tokens")
        self.pad_id = self.inner.pad_token_id if self.inner.pad_token_id is not None else 0

    @property
    def vocab_size(self) -> int:
        return len(self.inner)

    def encode(self, text: str) -> list:
        return self.inner(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.inner.decode(ids, skip_special_tokens=True)


def load_tokenizer(config):
    """--tokenizer (a WordTokenizer JSON file or a HF tokenizer directory), else the --llama
    checkpoint's tokenizer, else DATA/tokenizer.json (written by make_synthetic)."""
    path = config.tokenizer
    if path is None and config.llama and os.path.exists(os.path.join(config.llama, "tokenizer_config.json")):
        path = config.llama
    if path is None:
        path = os.path.join(config.data, "tokenizer.json")
    if os.path.isdir(path):
        return HFTokenizer(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (generate the data with "
                                f"python/make_synthetic.py or pass --tokenizer)")
    return WordTokenizer.load(path)
