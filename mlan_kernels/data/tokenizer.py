"""A word-level tokenizer built in code (no download): `tokenizers` WordLevel model, lowercase
normalizer, split on whitespace and around every punctuation character.

Special tokens have fixed ids: <pad>=0, <s>=1, </s>=2, <unk>=3; words follow, sorted, so the
same words always give the same ids. `save` writes the `tokenizers` JSON format, which
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` also reads.
"""
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")      # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
UNK = SPECIAL_TOKENS[UNK_ID]


def _normalizer():
    return normalizers.Lowercase()


def _pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


class WordTokenizer:
    """Wraps a `tokenizers.Tokenizer` whose vocabulary starts with SPECIAL_TOKENS at ids 0..3."""
    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
    chat_template = None                # no chat template; no image processor
    image_processor = None

    def __init__(self, tokenizer: Tokenizer):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise ValueError(f"tokenizer must map {token!r} to id {expected_id}, "
                                 f"got {tokenizer.token_to_id(token)}")
        self.tokenizer = tokenizer

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "WordTokenizer":
        """Vocabulary = SPECIAL_TOKENS + sorted set of the lowercased words (specials dropped)."""
        vocabulary = sorted({word.lower() for word in words} - set(SPECIAL_TOKENS))
        if any(not word or word.split() != [word] for word in vocabulary):
            raise ValueError("words must be non-empty and free of whitespace")
        token_ids = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + vocabulary)}
        tokenizer = Tokenizer(models.WordLevel(vocab=token_ids, unk_token=UNK))
        tokenizer.normalizer = _normalizer()
        tokenizer.pre_tokenizer = _pre_tokenizer()
        return cls(tokenizer)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """Vocabulary = every word (as this tokenizer splits them) of `texts`, sorted."""
        normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer()
        words = set()
        for text in texts:
            pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
            words.update(piece for piece, _ in pieces)
        return cls.from_words(words)

    @classmethod
    def load(cls, path) -> "WordTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; unknown words map to unk_id. Special tokens are not matched in
        text ("<s>" becomes "<", "s", ">"), so data cannot inject control tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (one call into the Rust tokenizer)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by single spaces; special tokens (ids 0..3, <unk> included) skipped."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS)])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A HuggingFace tokenizer (PreTrainedTokenizerBase, fast or slow) behind WordTokenizer's
    interface: encode(text) -> ids (no special tokens added), decode(ids), vocab_size, pad_id,
    bos_id (None when the tokenizer has no BOS, e.g. Qwen), eos_id, unk_id (None for byte-level
    vocabularies). pad_id falls back to 0 (LLaMA has none; padded positions are masked anyway).
    A processor (anything with a `.tokenizer`) is unwrapped; its image processor is kept in
    `image_processor`. transformers is not imported here: the object is duck-typed."""

    def __init__(self, tokenizer):
        self.image_processor = getattr(tokenizer, "image_processor", None)
        inner = tokenizer if hasattr(tokenizer, "convert_tokens_to_ids") else getattr(tokenizer, "tokenizer", None)
        if inner is None or not hasattr(inner, "convert_tokens_to_ids"):
            raise TypeError(f"tokenizer must be a HuggingFace tokenizer or processor, got "
                            f"{type(tokenizer).__name__}")
        self.inner = inner
        self.bos_id, self.eos_id, self.unk_id = inner.bos_token_id, inner.eos_token_id, inner.unk_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer {type(inner).__name__} needs an eos token (answers end with it)")
        self.pad_id = inner.pad_token_id if inner.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path) -> "HFTokenizer":
        """AutoTokenizer of a local directory (never downloaded)."""
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(path, local_files_only=True))

    @property
    def chat_template(self):
        """The tokenizer's chat template string, or None."""
        return getattr(self.inner, "chat_template", None) or None

    @property
    def vocab_size(self) -> int:
        return len(self.inner)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.inner(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.inner).__name__}, vocab_size={self.vocab_size})"


def as_tokenizer(tokenizer):
    """A tokenizer with our interface: a WordTokenizer or HFTokenizer as is, a HuggingFace
    tokenizer or processor wrapped in HFTokenizer; TypeError otherwise."""
    if isinstance(tokenizer, (WordTokenizer, HFTokenizer)):
        return tokenizer
    if hasattr(tokenizer, "convert_tokens_to_ids") or hasattr(tokenizer, "tokenizer"):
        return HFTokenizer(tokenizer)
    if all(hasattr(tokenizer, name) for name in ("encode", "bos_id", "eos_id", "pad_id")):
        return tokenizer
    raise TypeError(f"tokenizer must be a WordTokenizer, a HuggingFace tokenizer or processor, "
                    f"got {type(tokenizer).__name__}")
