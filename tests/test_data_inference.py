"""Answerer: one call answers questions with or without an image, with the training template
and image preprocessing, batched across prompt lengths and modalities, cut at EOS."""
import pytest
import torch
from PIL import Image

from mlan_kernels.data import InstructionDataset, Record
from mlan_kernels.data.dataset import prompt_ids
from mlan_kernels.data.inference import Answerer
from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from user_data import tiny_hf_tokenizer

pytest.importorskip("transformers")
QUESTIONS = ["say hello", "what colour is the square ?", "what is the shape of the square ?", "hi"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer")
    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (40, 24), colour).save(root / name)
    tokenizer = tiny_hf_tokenizer()
    torch.manual_seed(0)
    model = build_lavin(tiny_llama(vocab_size=len(tokenizer)), tiny_clip(), neck_hidden=16, dropout_p=0.0)
    for parameter in model.parameters():              # adapters away from identity
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.2)
    return model.eval(), tokenizer, [None, str(root / "red.png"), str(root / "blue.png"), None]


def alone(model, tokenizer, answerer, question, image):
    """What generate makes of one prompt, decoded up to EOS: the helper's answer built by hand."""
    ids = torch.tensor([prompt_ids(question, tokenizer)])
    pixels = None if image is None else answerer.pixels(image)[None]
    row = model.generate(ids, pixels, [image is not None], max_new_tokens=6, eos_token_id=2)[0].tolist()
    return tokenizer.decode(row[:row.index(2)] if 2 in row else row, skip_special_tokens=True)


def test_one_call_answers_a_batch_as_each_question_alone(setup):
    model, tokenizer, images = setup
    answerer = Answerer(model, tokenizer)
    answers = answerer.answer(QUESTIONS, images=images, max_new_tokens=6, batch_size=4)
    expected = [alone(model, tokenizer, answerer, q, image) for q, image in zip(QUESTIONS, images)]
    assert answers == expected and any(answers)
    assert answerer.answer(QUESTIONS[1], images=images[1], max_new_tokens=6) == expected[1]
    assert answerer.answer(QUESTIONS, images=images, max_new_tokens=6, batch_size=1) == expected


def test_the_image_is_preprocessed_as_in_training(setup):
    from transformers import CLIPImageProcessor
    model, tokenizer, images = setup
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    dataset = InstructionDataset([Record("a", [("human", "hi"), ("gpt", "hi")], image=images[1])],
                                 tokenizer, image_size=28, image_processor=processor)
    assert torch.equal(Answerer(model, tokenizer, image_processor=processor).pixels(images[1]),
                       dataset[0]["pixel_values"])
    plain = InstructionDataset(dataset.records, tokenizer, image_size=28)
    assert torch.equal(Answerer(model, tokenizer).pixels(images[1]), plain[0]["pixel_values"])


def test_answers_stop_at_eos_and_the_prompt_uses_the_template(setup, monkeypatch):
    model, tokenizer, _ = setup
    calls = []

    def fake_generate(input_ids, pixel_values, has_image, attention_mask, max_new_tokens, eos_token_id):
        calls.append((input_ids.tolist(), attention_mask.tolist(), eos_token_id))
        hello, red = tokenizer.convert_tokens_to_ids(["hello", "red"])
        return torch.tensor([[hello, 2, red], [red, red, 2]])

    monkeypatch.setattr(model, "generate", fake_generate)
    answers = Answerer(model, tokenizer, template="vicuna_v1").answer(["say hello", "hi"], max_new_tokens=3)
    assert answers == ["hello", "red red"]
    (ids, mask, eos), = calls
    long, short = prompt_ids("say hello", tokenizer, "vicuna_v1"), prompt_ids("hi", tokenizer, "vicuna_v1")
    assert ids[0] == long and ids[1] == short + [tokenizer.pad_token_id or 0] * (len(long) - len(short))
    assert mask[1] == [1] * len(short) + [0] * (len(long) - len(short)) and eos == 2
    with pytest.raises(ValueError, match="images must hold one entry per question"):
        Answerer(model, tokenizer).answer(["a", "b"], images=[None])
