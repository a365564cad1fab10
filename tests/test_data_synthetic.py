"""make_synthetic: deterministic, loads cleanly, every word known to its tokenizer, answers
correct for their questions and images, chance levels as documented."""
import json

import numpy as np
import pytest
from PIL import Image

from mlan_kernels.data import (InstructionDataset, WordTokenizer, chance_levels, load_records,
                               make_synthetic, task_from_id)
from mlan_kernels.data.synthetic import COLOURS, NUMBERS


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(out, train_size=60, eval_size=40, seed=3, image_size=28)


def read_bytes(result, name):
    with open(result[name], "rb") as file:
        return file.read()


def test_same_seed_same_files_other_seed_differs(synthetic, tmp_path):
    again = make_synthetic(tmp_path / "again", train_size=60, eval_size=40, seed=3)
    other = make_synthetic(tmp_path / "other", train_size=60, eval_size=40, seed=4)
    for name in ("train", "eval", "tokenizer", "meta"):
        assert read_bytes(again, name) == read_bytes(synthetic, name)
    assert read_bytes(other, "train") != read_bytes(synthetic, "train")
    image = next(r["image"] for r in map(json.loads, open(synthetic["eval"])) if "image" in r)
    with open(f"{synthetic['images']}/../{image}", "rb") as first, \
            open(f"{again['images']}/../{image}", "rb") as second:
        assert first.read() == second.read()


def test_loads_without_skips_and_counts_match(synthetic):
    meta = json.load(open(synthetic["meta"]))
    for split, size in (("train", 60), ("eval", 40)):
        records, report = load_records(synthetic[split])
        assert (report.loaded, report.skipped) == (size, 0)
        assert sum(r.has_image for r in records) == size // 2 == meta["splits"][split]["image"]
        tasks = meta["splits"][split]["tasks"]
        assert sum(tasks.values()) == size
        assert all(tasks[name] == sum(task_from_id(r.id) == name for r in records)
                   for name in tasks)


def test_every_eval_word_is_in_the_vocabulary_and_answers_are_one_token(synthetic):
    tokenizer = WordTokenizer.load(synthetic["tokenizer"])
    records, _ = load_records(synthetic["eval"])
    dataset = InstructionDataset(records, tokenizer)
    for index, record in enumerate(records):
        assert tokenizer.unk_id not in dataset[index]["input_ids"].tolist(), record.id
        answer = record.turns[-1][1]
        assert len(tokenizer.encode(answer)) == 1
        assert tokenizer.decode(tokenizer.encode(answer)) == answer


def expected_text_answer(task, question):
    words = question.replace(",", " ").split()
    numbers = [NUMBERS.index(w) for w in words if w in NUMBERS]
    return {"add": lambda: NUMBERS[sum(numbers)], "bigger": lambda: NUMBERS[max(numbers)],
            "repeat": lambda: words[-1] if "again" not in words else words[-3]}[task]()


def image_facts(path):
    """(nearest colour name of the bright pixels, fill ratio of their bounding box, the
    horizontal centre of that box in image widths)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    bright = pixels.max(axis=2) > 100
    rows, cols = np.nonzero(bright)
    mean = pixels[bright].mean(axis=0)
    colour = min(COLOURS, key=lambda name: np.abs(np.asarray(COLOURS[name]) - mean).sum())
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return colour, bright.sum() / box, (cols.min() + cols.max() + 1) / 2 / pixels.shape[1]


def test_answers_match_questions_and_images(synthetic):
    records, _ = load_records(synthetic["eval"])
    for record in records:
        task, question, answer = task_from_id(record.id), record.turns[0][1], record.turns[1][1]
        if not record.has_image:
            assert answer == expected_text_answer(task, question), record.id
            continue
        colour, fill, centre = image_facts(record.image)
        if task == "colour":
            assert answer == colour, record.id
        elif task == "shape":
            expected = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
            assert answer == expected, (record.id, fill)
        else:
            assert task == "side" and abs(centre - 0.5) >= 0.1, (record.id, centre)
            assert answer == ("left" if centre < 0.5 else "right"), (record.id, centre)


def test_chance_levels(synthetic):
    meta = json.load(open(synthetic["meta"]))
    tasks = meta["tasks"]
    assert tasks["colour"]["chance"] == 1 / len(COLOURS) and tasks["shape"]["chance"] == 1 / 3
    assert tasks["bigger"]["chance"] == 1 / 2 and tasks["add"]["chance"] == 1 / 10
    assert tasks["side"]["chance"] == 1 / 2
    counts = meta["splits"]["eval"]["tasks"]
    image = ((counts["colour"] / 6 + counts["shape"] / 3 + counts["side"] / 2)
             / (counts["colour"] + counts["shape"] + counts["side"]))
    assert meta["chance"]["image"] == pytest.approx(image)
    assert chance_levels(meta) == meta["chance"]
    hand_made = {"tasks": {"a": {"modality": "text", "chance": 0.5},
                           "b": {"modality": "text", "chance": 0.1}},
                 "splits": {"eval": {"tasks": {"a": 1, "b": 3}}}}
    assert chance_levels(hand_made) == {"text": pytest.approx(0.2), "image": None}


@pytest.mark.parametrize("kwargs, name", [({"train_size": -1}, "train_size"),
                                          ({"image_fraction": 2.0}, "image_fraction"),
                                          ({"image_size": 4}, "image_size")])
def test_bad_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_synthetic(tmp_path, **kwargs)
