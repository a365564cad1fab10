"""Answer-token masks and held-out accuracy per modality.

Positions: logits[:, p] predicts assembled label p + 1 (LavinModel.assemble_labels), so the
answer mask of the logits is `labels[:, 1:] != -100`, shifted into [:, :-1].
Accuracy = exact match: a sample counts as correct when the argmax at every answer position
(answer words and the closing </s>) is the label — what greedy decoding would produce.
"""
import torch
from torch import Tensor

from ...integrations.lavin import IGNORE_INDEX
from .batches import batch_to, iterate_batches


def answer_mask(assembled_labels: Tensor) -> Tensor:
    """[B, S] labels -> [B, S] bool: True where the logits predict an answer token."""
    mask = torch.zeros_like(assembled_labels, dtype=torch.bool)
    mask[:, :-1] = assembled_labels[:, 1:] != IGNORE_INDEX
    return mask


def exact_match(logits: Tensor, assembled_labels: Tensor) -> Tensor:
    """logits [B, S, V], labels [B, S] -> [B] bool (all answer tokens predicted)."""
    mask = answer_mask(assembled_labels)
    targets = torch.roll(assembled_labels, -1, dims=1)
    wrong = (logits.argmax(-1) != targets) & mask
    return ~wrong.any(1) & mask.any(1)


@torch.no_grad()
def evaluate(model, dataset, indices_by_modality: dict, batch_size: int, device, pad_id: int,
             autocast, group_of=lambda sample_id: "all") -> dict:
    """{modality: {"accuracy", "loss", "samples", "by_task"}} of a LavinModel on the held-out
    indices (eval mode, restored after). indices_by_modality: {"text": [...], "image": [...]};
    empty modalities are left out. group_of(sample id) -> task name for "by_task"."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for modality, indices in indices_by_modality.items():
            if not indices:
                continue
            loss_sum, hits = 0.0, {}
            for batch in iterate_batches(dataset, indices, batch_size, pad_id):
                inputs = batch_to(batch, device)
                with autocast():
                    out = model(**inputs)
                labels = model.assemble_labels(inputs["labels"], inputs["attention_mask"],
                                               inputs["has_image"])
                matches = exact_match(out.logits.float(), labels).tolist()
                for sample_id, match in zip(batch["ids"], matches):
                    hits.setdefault(group_of(sample_id), []).append(match)
                loss_sum += float(out.loss) * len(batch["ids"])
            count = sum(len(values) for values in hits.values())
            results[modality] = {"accuracy": sum(map(sum, hits.values())) / count,
                                 "loss": loss_sum / count, "samples": count,
                                 "by_task": {task: sum(v) / len(v) for task, v in sorted(hits.items())}}
    finally:
        model.train(was_training)
    return results
