"""Tokenizer choice of the training program: our in-code WordTokenizer (synthetic data), or a
local HuggingFace tokenizer (the --llama checkpoint's), behind the same small interface:
encode(text) -> ids (no special tokens), decode(ids), vocab_size, pad_id, bos_id, eos_id."""
import os

from mlan_kernels.data.tokenizer import WordTokenizer

MAX_TOKENIZER_BYTES = 256 << 20         # LLaMA's tokenizer.json is about 2 MB


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
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (generate the data with "
                                f"python/make_synthetic.py or pass --tokenizer)")
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise ValueError(f"tokenizer {path}: not a regular file or a directory")
    if os.path.isfile(path) and os.path.getsize(path) > MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer {path}: {os.path.getsize(path)} bytes, more than the "
                         f"{MAX_TOKENIZER_BYTES} a tokenizer file may have")
    try:
        return HFTokenizer(path) if os.path.isdir(path) else WordTokenizer.load(path)
    except ValueError as error:
        raise ValueError(f"tokenizer {path}: {error}") from None
    except Exception as error:          # tokenizers raises a bare Exception for a bad file
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"tokenizer {path}: unreadable ({message[:160]})") from None
