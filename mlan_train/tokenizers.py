"""Tokenizer and image processor of the training program: our in-code WordTokenizer (synthetic
data), or a local HuggingFace tokenizer (the --llama checkpoint's) wrapped in the data layer's
HFTokenizer, behind the same small interface: encode(text) -> ids (no special tokens),
decode(ids), vocab_size, pad_id, bos_id, eos_id, unk_id, chat_template."""
import os

from mlan_kernels.data.tokenizer import HFTokenizer, WordTokenizer

__all__ = ["HFTokenizer", "data_directory", "load_image_processor", "load_tokenizer"]


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
    if os.path.isdir(path):
        return HFTokenizer.from_pretrained(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (generate the data with "
                                f"python/make_synthetic.py or pass --tokenizer)")
    return WordTokenizer.load(path)


def load_image_processor(config):
    """The --clip checkpoint's image processor (preprocessor_config.json), or None: images then
    go through the built-in resize + CLIP normalization."""
    if not config.clip or not os.path.isfile(os.path.join(config.clip, "preprocessor_config.json")):
        return None
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(config.clip, local_files_only=True)
