"""Tokenizer and image processor of the training program: our in-code WordTokenizer (synthetic
data), or a local HuggingFace tokenizer (the --llama checkpoint's) wrapped in the data layer's
HFTokenizer, behind the same small interface: encode(text) -> ids (no special tokens),
decode(ids), vocab_size, pad_id, bos_id, eos_id, unk_id, chat_template."""
import os

from mlan_kernels.data.tokenizer import HFTokenizer, WordTokenizer

__all__ = ["HFTokenizer", "data_directory", "load_image_processor", "load_tokenizer"]

MAX_TOKENIZER_BYTES = 256 << 20         # LLaMA's tokenizer.json is about 2 MB


def data_directory(config) -> str:
    """--data if it is a directory, else the directory of the --data file."""
    return config.data if os.path.isdir(config.data) else os.path.dirname(config.data) or "."


def load_tokenizer(config):
    """--tokenizer (a WordTokenizer JSON file or a HF tokenizer directory), else the --llama
    checkpoint's tokenizer, else DATA/tokenizer.json (written by make_synthetic)."""
    path = config.tokenizer
    if path is None and config.llama and os.path.exists(os.path.join(config.llama, "tokenizer_config.json")):
        path = config.llama
    if path is None:
        path = os.path.join(data_directory(config), "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (generate the data with "
                                f"python/make_synthetic.py or pass --tokenizer)")
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise ValueError(f"tokenizer {path}: not a regular file or a directory")
    if os.path.isfile(path) and os.path.getsize(path) > MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer {path}: {os.path.getsize(path)} bytes, more than the "
                         f"{MAX_TOKENIZER_BYTES} a tokenizer file may have")
    try:
        return HFTokenizer.from_pretrained(path) if os.path.isdir(path) else WordTokenizer.load(path)
    except ValueError as error:
        raise ValueError(f"tokenizer {path}: {error}") from None
    except Exception as error:          # tokenizers raises a bare Exception for a bad file
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"tokenizer {path}: unreadable ({message[:160]})") from None


def load_image_processor(config):
    """The --clip checkpoint's image processor (preprocessor_config.json), or None: images then
    go through the built-in resize + CLIP normalization."""
    if not config.clip or not os.path.isfile(os.path.join(config.clip, "preprocessor_config.json")):
        return None
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(config.clip, local_files_only=True)
