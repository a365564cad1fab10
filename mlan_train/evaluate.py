"""Answer-token masks and held-out accuracy and loss per modality.

Positions: logits[:, p] predicts assembled label p + 1 (LavinModel.assemble_labels), so the
answer mask of the logits is `labels[:, 1:] != -100`, shifted into [:, :-1].
Accuracy = exact match: a sample counts as correct when the argmax at every answer position
(answer words and the closing </s>) is the label — what greedy decoding would produce.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from mlan_kernels.integrations.lavin import IGNORE_INDEX
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
def evaluation_counts(model, dataset, indices_by_modality: dict, batch_size: int, device, pad_id: int,
                      autocast, group_of=lambda sample_id: "all") -> dict:
    """Raw held-out counts of a LavinModel (eval mode, restored after), summable across ranks:
    {modality: {"loss_sum": Σ answer-token cross-entropy, "tokens": answer tokens,
    "by_task": {task: [correct, samples]}}}. indices_by_modality: {"text": [...], "image": [...]};
    empty modalities are left out. group_of(sample id) -> task name."""
    was_training = model.training
    model.eval()
    counts = {}
    try:
        for modality, indices in indices_by_modality.items():
            if not indices:
                continue
            entry = counts[modality] = {"loss_sum": 0.0, "tokens": 0, "by_task": {}}
            for batch in iterate_batches(dataset, indices, batch_size, pad_id):
                inputs = batch_to(batch, device)
                with autocast():                      # no labels: the model computes no loss
                    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
                labels = model.assemble_labels(inputs["labels"], inputs["attention_mask"],
                                               inputs["has_image"])
                targets = labels[:, 1:]
                entry["loss_sum"] += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                                                           ignore_index=IGNORE_INDEX, reduction="sum"))
                entry["tokens"] += int((targets != IGNORE_INDEX).sum())
                for sample_id, match in zip(batch["ids"], exact_match(logits, labels).tolist()):
                    tally = entry["by_task"].setdefault(group_of(sample_id), [0, 0])
                    tally[0] += int(match)
                    tally[1] += 1
    finally:
        model.train(was_training)
    return counts


def merge_counts(counts_per_rank: list) -> dict:
    """Sum evaluation_counts dicts (one per rank) into one."""
    merged = {}
    for counts in counts_per_rank:
        for modality, entry in counts.items():
            total = merged.setdefault(modality, {"loss_sum": 0.0, "tokens": 0, "by_task": {}})
            total["loss_sum"] += entry["loss_sum"]
            total["tokens"] += entry["tokens"]
            for task, (correct, samples) in entry["by_task"].items():
                tally = total["by_task"].setdefault(task, [0, 0])
                tally[0] += correct
                tally[1] += samples
    return merged


def summarize_counts(counts: dict) -> dict:
    """{modality: {"accuracy", "loss" (mean answer-token cross-entropy), "samples", "by_task"}}."""
    results = {}
    for modality, entry in counts.items():
        tallies = entry["by_task"].values()
        samples = sum(n for _, n in tallies)
        results[modality] = {"accuracy": sum(c for c, _ in tallies) / samples,
                             "loss": entry["loss_sum"] / max(entry["tokens"], 1), "samples": samples,
                             "by_task": {task: c / n for task, (c, n) in sorted(entry["by_task"].items())}}
    return results
