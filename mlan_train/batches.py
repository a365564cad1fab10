"""Moving collated batches to a device and iterating fixed index lists in batches."""
from mlan_kernels.data.collate import collate

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "has_image")


def batch_to(batch: dict, device) -> dict:
    """The LavinModel.forward keyword arguments of a collated batch, on `device`."""
    return {key: None if batch[key] is None else batch[key].to(device) for key in MODEL_KEYS}


def iterate_batches(dataset, indices, batch_size: int, pad_id: int):
    """Collated batches of dataset[indices] in order (the last one may be smaller)."""
    for start in range(0, len(indices), batch_size):
        yield collate([dataset[i] for i in indices[start:start + batch_size]], pad_id=pad_id)
