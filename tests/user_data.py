"""Builders for the "your own data" tests: a tiny HuggingFace tokenizer made in code (a
`tokenizers` WordLevel model wrapped in PreTrainedTokenizerFast, with a chat template), and a
LLaVA-format dataset (one .json list) whose images live in a separate folder. No downloads."""
import json
from pathlib import Path

from PIL import Image

# [INST]-style: BOS, then per user turn "[INST] q [/INST]", per assistant turn " a" + EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                 "[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
                 "{% endif %}{% endfor %}")
WORDS = ("what", "colour", "is", "the", "square", "?", "red", "blue", "green", "say", "hello",
         "hi", "[", "]", "/", "inst", "a", "of", "answer", "question", "yes", "no", "shape")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def tiny_hf_tokenizer(words=WORDS, chat_template=CHAT_TEMPLATE):
    """A PreTrainedTokenizerFast over <pad> <s> </s> <unk> + `words` (lowercased, split on
    whitespace and punctuation), with `chat_template` (None = none)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocabulary = ["<pad>", "<s>", "</s>", "<unk>"] + sorted(set(words))
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def llava_dataset(root, count=24, image_size=16) -> tuple[Path, Path]:
    """(root/data/llava.json, root/images): `count` LLaVA records alternating an image question
    ("what colour is the square ?" -> its colour) and a text one ("say hello" -> "hello")."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records, names = [], list(COLOURS)
    for index in range(count):
        if index % 2 == 0:
            colour = names[index // 2 % len(names)]
            Image.new("RGB", (image_size, image_size), COLOURS[colour]).save(root / "images" / f"{index}.png")
            records.append({"id": f"img{index}", "image": f"{index}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the square ?"},
                {"from": "gpt", "value": colour}]})
        else:
            records.append({"id": f"txt{index}", "conversations": [
                {"from": "human", "value": "say hello"}, {"from": "gpt", "value": "hello"}]})
    path = root / "data" / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path, root / "images"
