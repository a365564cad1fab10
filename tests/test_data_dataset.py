"""InstructionDataset: assistant-only labels, truncation, lazy CLIP-normalized images, and the
zero image (with a warning) when an image disappears after loading."""
import pytest
import torch
from PIL import Image

from mlan_kernels.data import (IGNORE_INDEX, InstructionDataset, Record, WordTokenizer,
                               split_by_modality)
from mlan_kernels.data.dataset import CLIP_MEAN, CLIP_STD

TURNS = [("human", "what is two plus two ?"), ("gpt", "four"),
         ("human", "and the colour ?"), ("gpt", "red , bright red")]


@pytest.fixture
def tokenizer():
    return WordTokenizer.from_texts(["user : assistant :"] + [text for _, text in TURNS])


@pytest.fixture
def white_image(tmp_path):
    path = tmp_path / "white.png"
    Image.new("RGB", (40, 20), (255, 255, 255)).save(path)
    return str(path)


def labelled(sample):
    return sample["labels"] != IGNORE_INDEX


def test_labels_cover_answers_and_eos_only(tokenizer):
    sample = InstructionDataset([Record("r", TURNS)], tokenizer)[0]
    input_ids, labels = sample["input_ids"], sample["labels"]
    assert input_ids.dtype == labels.dtype == torch.long and input_ids.shape == labels.shape
    assert tokenizer.decode(input_ids) == ("user : what is two plus two ? assistant : four "
                                           "user : and the colour ? assistant : red , bright red")
    assert input_ids[0] == tokenizer.bos_id and labels[0] == IGNORE_INDEX
    mask = labelled(sample)
    assert torch.equal(labels[mask], input_ids[mask])
    assert tokenizer.decode(labels[mask]) == "four red , bright red"
    eos = (input_ids == tokenizer.eos_id).nonzero().flatten()
    assert len(eos) == 2 and mask[eos].all() and eos[-1] == len(input_ids) - 1
    assert int(mask.sum()) == len(tokenizer.encode("four red , bright red")) + 2


def test_truncation_from_the_right_keeps_a_label(tokenizer):
    full = InstructionDataset([Record("r", TURNS)], tokenizer)[0]
    first_label = int(labelled(full).nonzero()[0])
    dataset = InstructionDataset([Record("r", TURNS), Record("short", TURNS[:2])], tokenizer,
                                 max_length=first_label + 3)
    sample = dataset[0]
    assert len(dataset[1]["input_ids"]) == first_label + 2          # fits: not truncated
    assert dataset.truncated == 1
    assert torch.equal(sample["input_ids"], full["input_ids"][:first_label + 3])
    assert torch.equal(sample["labels"], full["labels"][:first_label + 3])


def test_truncation_below_the_first_answer_cuts_the_prompt(tokenizer):
    full = InstructionDataset([Record("r", TURNS)], tokenizer)[0]
    first_label = int(labelled(full).nonzero()[0])
    sample = InstructionDataset([Record("r", TURNS)], tokenizer, max_length=4)[0]
    assert len(sample["input_ids"]) == 4 and sample["input_ids"][0] == tokenizer.bos_id
    assert torch.equal(sample["input_ids"][1:], full["input_ids"][first_label - 2:first_label + 1])
    assert labelled(sample).tolist() == [False, False, False, True]


def test_images_are_loaded_lazily_and_clip_normalized(tokenizer, white_image):
    records = [Record("text", TURNS[:2]), Record("image", TURNS[:2], white_image)]
    dataset = InstructionDataset(records, tokenizer, image_size=16)
    text, image = dataset[0], dataset[1]
    assert text["pixel_values"] is None and not text["has_image"]
    assert image["has_image"] and image["pixel_values"].shape == (3, 16, 16)
    assert image["pixel_values"].dtype == torch.float32
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(image["pixel_values"][:, 3, 5], expected)
    assert dataset.has_image == [False, True]
    assert dataset.lengths == [len(text["input_ids"]), len(image["input_ids"])]
    assert split_by_modality(dataset) == ([0], [1])


def test_image_lost_after_loading_gives_zeros_and_a_warning(tokenizer, white_image, tmp_path):
    dataset = InstructionDataset([Record("lost-one", TURNS[:2], white_image)], tokenizer)
    (tmp_path / "white.png").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="record 'lost-one'"):
        sample = dataset[0]
    assert torch.equal(sample["pixel_values"], torch.zeros(3, 28, 28))
    assert dataset.image_errors == 1


@pytest.mark.parametrize("kwargs, name", [({"max_length": 1}, "max_length"),
                                          ({"image_size": 0}, "image_size")])
def test_bad_arguments_are_named(tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        InstructionDataset([Record("r", TURNS)], tokenizer, **kwargs)


def test_unknown_role_is_named(tokenizer):
    with pytest.raises(ValueError, match="'system'"):
        InstructionDataset([Record("r", [("system", "x"), ("gpt", "y")])], tokenizer)
