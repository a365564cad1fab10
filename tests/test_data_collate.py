"""collate: padding, masks, image rows of image samples only, and LavinModel accepting the batch;
TokenCounter arithmetic."""
import pytest
import torch

from mlan_kernels.data import IGNORE_INDEX, TokenCounter, collate


def sample(sample_id, length, image_value=None, image_size=4):
    """input_ids 10..10+length, labels = input_ids on the last two tokens; image [3, S, S]
    filled with image_value (None: text-only)."""
    input_ids = torch.arange(10, 10 + length)
    labels = torch.full((length,), IGNORE_INDEX)
    labels[-2:] = input_ids[-2:]
    pixels = None if image_value is None else torch.full((3, image_size, image_size), float(image_value))
    return {"id": sample_id, "input_ids": input_ids, "labels": labels, "pixel_values": pixels,
            "has_image": image_value is not None}


def test_collate_pads_right_and_keeps_image_rows_in_order():
    batch = collate([sample("a", 3, 1.0), sample("b", 5), sample("c", 4, 2.0)], pad_id=7)
    assert batch["ids"] == ["a", "b", "c"]
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 5)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 7, 7]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 1, 1, 0]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["has_image"].dtype == torch.bool
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]


def test_text_only_batch_has_no_pixels_and_errors_are_named():
    assert collate([sample("a", 2), sample("b", 3)])["pixel_values"] is None
    with pytest.raises(ValueError, match="samples"):
        collate([])
    broken = sample("x", 2, 1.0)
    broken["pixel_values"] = None
    with pytest.raises(ValueError, match="'x'.*pixel_values"):
        collate([broken])


def test_token_counter_arithmetic():
    counter = TokenCounter()
    counter.add(collate([sample("a", 3, 1.0), sample("b", 5), sample("c", 4, 2.0)]),
                image_tokens_per_sample=6)
    assert counter.as_dict() == {"text_tokens": 12, "image_tokens": 12, "padded_tokens": 3,
                                 "samples_text": 1, "samples_image": 2, "total_tokens": 24}
    other = TokenCounter().add(collate([sample("d", 2), sample("e", 2)]), 6)
    assert other.as_dict()["samples_text"] == 2 and other.padded_tokens == 0
    counter.merge(other)
    assert (counter.text_tokens, counter.image_tokens, counter.padded_tokens) == (16, 12, 3)
    assert (counter.samples_text, counter.samples_image, counter.total_tokens) == (3, 2, 28)
    with pytest.raises(ValueError, match="image_tokens_per_sample"):
        counter.add(collate([sample("a", 1)]), -1)


@pytest.fixture
def one_thread():
    """Tiny matmuls on a loaded 2-core machine are far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lavin_model_takes_a_collated_batch(one_thread):
    from mlan_kernels import build_lavin
    from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
    model = build_lavin(tiny_llama(vocab_size=32), tiny_clip(image_size=28))
    batch = collate([sample("a", 3, 0.5, 28), sample("b", 6), sample("c", 4, -0.5, 28)])
    batch.pop("ids")
    inputs = model.build_inputs(**batch)
    k = model.image_token_count
    assert inputs["lengths"].tolist() == [1 + k + 3, 1 + 6, 1 + k + 4]
    assert int((inputs["labels"] != IGNORE_INDEX).sum()) == 6
    assert torch.isfinite(model(**batch).loss)
