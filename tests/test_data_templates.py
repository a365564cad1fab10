"""The model's own tokenizer, chat template and image processor in the data layer: a HF
tokenizer (or processor) goes into InstructionDataset directly; the chat template or a named
LLaVA template formats the text with labels on answers only; unknown template words and
answer tokens are counted and warned about (an error when strict); a huge text value costs
what max_length can use."""
import time
import types
import warnings

import pytest
import torch
from PIL import Image

from mlan_kernels.data import HFTokenizer, InstructionDataset, Record, WordTokenizer, as_tokenizer
from mlan_kernels.data import dataset as dataset_module
from mlan_kernels.data.dataset import IGNORE_INDEX, prompt_ids, tokenize_turns
from mlan_kernels.data.templates import EOS, LLAVA_SYSTEM, VICUNA_SYSTEM, get_template
from user_data import tiny_hf_tokenizer

pytest.importorskip("transformers")
TURNS = [("human", "say hello"), ("gpt", "hello"), ("human", "what colour is the square ?"),
         ("gpt", "red")]


def ids(tokenizer, tokens):
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def rendered(template_name, turns, tokenizer=None):
    """The text of a named template's segments, EOS written as "</s>"."""
    segments = get_template(template_name, tokenizer).segments(turns, tokenizer)
    return "".join("</s>" if piece is EOS else piece for piece, _ in segments)


def test_the_chat_template_formats_and_labels_only_the_answers():
    tokenizer = tiny_hf_tokenizer()
    input_ids, labels = tokenize_turns(TURNS, tokenizer)          # "auto" -> the chat template
    prompt = ["[", "inst", "]", "say", "hello", "[", "/", "inst", "]"]
    second = ["[", "inst", "]", "what", "colour", "is", "the", "square", "?", "[", "/", "inst", "]"]
    expected = ids(tokenizer, ["<s>"] + prompt + ["hello", "</s>"] + second + ["red", "</s>"])
    assert input_ids == expected
    learned = [token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert learned == ids(tokenizer, ["hello", "</s>", "red", "</s>"])
    assert [label for label in labels if label != IGNORE_INDEX] == learned
    whole = tokenizer.apply_chat_template([{"role": "user" if r == "human" else "assistant", "content": t}
                                           for r, t in TURNS], tokenize=False)
    assert tokenizer(whole, add_special_tokens=False)["input_ids"] == input_ids
    assert prompt_ids("say hello", tokenizer) == ids(tokenizer, ["<s>"] + prompt)


def test_named_templates_write_llava_s_text():
    assert rendered("vicuna_v1", TURNS[:2]) == f"{VICUNA_SYSTEM} USER: say hello ASSISTANT: hello</s>"
    assert rendered("llava_llama_3", TURNS[:2]) == (
        f"<|start_header_id|>system<|end_header_id|>\n\n{LLAVA_SYSTEM}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nsay hello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>")
    assert rendered("plain", TURNS[:2]) == "say hello\nhello</s>"
    assert rendered("mlan", TURNS[:2]) == "user : say hello assistant :hello</s>"
    tokenizer = WordTokenizer.from_texts([VICUNA_SYSTEM, "user : assistant : say hello"])
    input_ids, labels = tokenize_turns(TURNS[:2], tokenizer, "vicuna_v1")
    assert tokenizer.decode(input_ids) == (VICUNA_SYSTEM.lower().replace(".", " .").replace("'", " ' ")
                                           .replace(",", " ,").replace("  ", " ")
                                           + " user : say hello assistant : hello")
    assert [label for label in labels if label != IGNORE_INDEX] == tokenizer.encode("hello") + [tokenizer.eos_id]


def test_template_selection():
    hf, word = as_tokenizer(tiny_hf_tokenizer()), WordTokenizer.from_words(["a"])
    assert get_template(None, hf).name == "chat" and get_template("auto", word).name == "mlan"
    assert get_template("vicuna_v1", hf).name == "vicuna_v1"
    with pytest.raises(ValueError, match="template 'chat' needs a HuggingFace tokenizer with a chat_template"):
        get_template("chat", as_tokenizer(tiny_hf_tokenizer(chat_template=None)))
    with pytest.raises(ValueError, match="template must be one of .*got 'chatml'"):
        get_template("chatml", hf)
    with pytest.raises(TypeError, match="tokenizer must be a WordTokenizer, a HuggingFace"):
        as_tokenizer(object())


def test_instruction_dataset_takes_a_hf_tokenizer_or_processor_directly(tmp_path):
    from transformers import CLIPImageProcessor
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    records = [Record("i", TURNS[:2], image=str(tmp_path / "a.png")), Record("t", TURNS[2:])]
    tokenizer = tiny_hf_tokenizer()
    dataset = InstructionDataset(records, tokenizer, max_length=32)
    assert isinstance(dataset.tokenizer, HFTokenizer) and dataset.template.name == "chat"
    assert dataset[1]["input_ids"].tolist() == tokenize_turns(TURNS[2:], tokenizer)[0]
    processor = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    bundle = types.SimpleNamespace(tokenizer=tokenizer, image_processor=processor)   # a processor
    dataset = InstructionDataset(records, bundle, max_length=32)
    with Image.open(tmp_path / "a.png") as image:
        expected = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    assert dataset[0]["pixel_values"].shape == (3, 20, 20)
    assert torch.equal(dataset[0]["pixel_values"], expected)
    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="unreadable"):
        assert dataset[0]["pixel_values"].shape == (3, 20, 20)          # zeros of the right shape


def test_unknown_template_words_and_answers_warn_with_a_count_or_raise_when_strict():
    tokenizer = tiny_hf_tokenizer(chat_template=None)                # no "user", ":", "assistant"
    records = [Record("a", [("human", "say hello"), ("gpt", "hello zebra okapi")])]
    with pytest.warns(UserWarning, match=r"4 words of template 'mlan' \[':', 'assistant', 'user'\] "
                                         r"and 2 answer tokens map to the tokenizer's unknown token"):
        dataset = InstructionDataset(records, tokenizer)
    assert dataset.unknown_tokens == {"template": 4, "answers": 2}
    with pytest.raises(ValueError, match="4 words of template 'mlan'.*2 answer tokens.*another template"):
        InstructionDataset(records, tokenizer, strict_vocab=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        known = InstructionDataset([Record("b", [("human", "say"), ("gpt", "hello")])], tiny_hf_tokenizer())
    assert known.unknown_tokens == {"template": 0, "answers": 0}


def test_a_huge_text_value_is_bounded_before_tokenizing(monkeypatch):
    tokenizer = WordTokenizer.from_words(["user", ":", "assistant", "a", "b", "c", "yes"])
    seen = []
    original = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: seen.append(len(text)) or original(text))
    huge = "a b c " * 3_500_000                                      # 21 MB
    records = [Record("huge-question", [("human", huge), ("gpt", "yes")]),
               Record("huge-answer", [("human", "a"), ("gpt", huge)])]
    start = time.perf_counter()
    dataset = InstructionDataset(records, tokenizer, max_length=64)
    assert time.perf_counter() - start < 5.0
    assert max(seen) <= 2 * dataset_module.CHARS_PER_TOKEN * 64 + 1 + len("user :  assistant :")
    assert dataset.truncated == 2 and dataset.answers_truncated == 2   # the question's keeps 1 label
    # the same samples as tokenizing the whole text (checked on a 60 KB value)
    medium = [Record(r.id, [(role, text[:60_000]) for role, text in r.turns]) for r in records]
    bounded = InstructionDataset(medium, tokenizer, max_length=64)
    monkeypatch.setattr(dataset_module, "CHARS_PER_TOKEN", 10**9)
    whole = InstructionDataset(medium, tokenizer, max_length=64)
    for (ids_a, labels_a), (ids_b, labels_b) in zip(bounded.samples, whole.samples):
        assert torch.equal(ids_a, ids_b) and torch.equal(labels_a, labels_b)
    assert [t for t in bounded.samples[0][1].tolist() if t != IGNORE_INDEX] == tokenizer.encode("yes")
