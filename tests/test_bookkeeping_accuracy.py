"""Held-out accuracy on inputs whose answer is counted by hand (mlan_train/evaluate.py).

* answer_mask marks the logits positions p whose next label (p + 1) is an answer token — written
  out position by position, not compared with the function itself;
* exact_match is True exactly for the samples whose argmax matches every answer token (k of n
  right, wrong predictions outside the answer ignored, a sample without answers never right);
* evaluation_counts / merge_counts / summarize_counts report the hand-counted correct samples,
  answer tokens and mean answer-token cross-entropy of a model whose predictions are chosen.
"""
import math

import torch

from mlan_train.evaluate import answer_mask, evaluation_counts, exact_match, merge_counts, summarize_counts

IGNORE = -100
VOCAB = 8
# Four samples of six assembled positions; the answer tokens are at 2..3, 1..4, 3..5 and none.
LABELS = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE, IGNORE],
                       [IGNORE, 3, 4, 4, 7, IGNORE],
                       [IGNORE, IGNORE, IGNORE, 1, 2, 3],
                       [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]])
# Logits position p predicts label p + 1: the answer positions, counted by hand.
MASK = torch.tensor([[0, 1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 0],
                     [0, 0, 0, 0, 0, 0]], dtype=torch.bool)


def logits_predicting(tokens):
    """[B, S, VOCAB] logits whose argmax at [b, p] is tokens[b][p]."""
    return torch.nn.functional.one_hot(torch.tensor(tokens), VOCAB).float() * 5.0


def test_answer_mask_marks_the_positions_that_predict_an_answer_token():
    assert torch.equal(answer_mask(LABELS), MASK)
    assert answer_mask(LABELS).dtype == torch.bool


def test_exact_match_is_true_for_exactly_the_samples_whose_answers_are_all_predicted():
    predictions = [[0, 5, 6, 0, 0, 0],        # both answer tokens right: correct
                   [3, 4, 4, 7, 1, 1],        # all four right (the last position is free): correct
                   [0, 0, 1, 2, 0, 0],        # 1 and 2 right, 3 predicted as 0: wrong
                   [0, 0, 0, 0, 0, 0]]        # no answer tokens: never correct
    assert exact_match(logits_predicting(predictions), LABELS).tolist() == [True, True, False, False]


def test_a_wrong_prediction_outside_the_answer_does_not_count():
    predictions = [[7, 5, 6, 7, 7, 7], [3, 4, 4, 7, 7, 7], [7, 7, 1, 2, 3, 7], [7] * 6]
    assert exact_match(logits_predicting(predictions), LABELS).tolist() == [True, True, True, False]


def test_predicting_the_current_label_instead_of_the_next_is_wrong():
    """A model that copies its input (label p at position p) gets no sample right here."""
    copies = LABELS.clamp(min=0).tolist()
    assert exact_match(logits_predicting(copies), LABELS).tolist() == [False, False, False, False]


class ChosenPredictions(torch.nn.Module):
    """A stand-in LavinModel without image tokens (assembled labels = labels, which equal the
    input ids at answer positions): predicts the next input token, except in the samples whose
    first token is in `wrong`, where it predicts that token + 1. Prediction logit 5, others 0."""

    def __init__(self, wrong):
        super().__init__()
        self.wrong = set(wrong)

    def assemble_labels(self, labels, attention_mask, has_image):
        return labels

    def forward(self, input_ids, attention_mask, pixel_values, has_image):
        targets = torch.roll(input_ids, -1, dims=1)
        for row, first in enumerate(input_ids[:, 0].tolist()):
            if first in self.wrong:
                targets[row] = (targets[row] + 1) % VOCAB
        return type("Output", (), {"logits": logits_predicting(targets.tolist())})()


def sample(identifier, first, labels):
    """A text sample whose input ids are `first` and then its labels (0 where ignored)."""
    labels = torch.tensor(labels)
    input_ids = labels.clamp(min=0)
    input_ids[0] = first
    return {"id": identifier, "input_ids": input_ids, "labels": labels, "pixel_values": None,
            "has_image": False}


def test_evaluation_counts_report_hand_counted_accuracy_tokens_and_loss():
    # Five text samples of 3, 3, 2, 1 and 3 answer tokens; samples 1 and 4 are predicted wrong.
    samples = [sample("a-0", 0, [IGNORE, 2, 3, 4]), sample("a-1", 1, [IGNORE, 2, 3, 4]),
               sample("b-2", 2, [IGNORE, IGNORE, 5, 6]), sample("b-3", 3, [IGNORE, IGNORE, IGNORE, 7]),
               sample("b-4", 4, [IGNORE, 1, 1])]
    counts = evaluation_counts(ChosenPredictions(wrong={1, 4}), samples,
                               {"text": [0, 1, 2, 3, 4], "image": []}, batch_size=2, device="cpu",
                               pad_id=0, autocast=lambda: torch.autocast("cpu", enabled=False),
                               group_of=lambda sample_id: sample_id.split("-")[0])
    assert set(counts) == {"text"}                       # an empty modality is left out
    text = counts["text"]
    assert text["tokens"] == 3 + 3 + 2 + 1 + 2
    assert text["by_task"] == {"a": [1, 2], "b": [2, 3]}
    log_partition = math.log(math.exp(5.0) + VOCAB - 1)   # every row: one logit 5, the rest 0
    right, wrong = log_partition - 5.0, log_partition     # cross-entropy of a right / wrong token
    assert math.isclose(text["loss_sum"], 6 * right + 5 * wrong, rel_tol=1e-5)
    summary = summarize_counts(merge_counts([counts, counts]))["text"]
    assert summary["samples"] == 10 and math.isclose(summary["accuracy"], 3 / 5)
    assert summary["by_task"] == {"a": 0.5, "b": 2 / 3}
    assert math.isclose(summary["loss"], (6 * right + 5 * wrong) / 11, rel_tol=1e-5)
