"""InstructionDataset's truncation counts on multi-turn records cut at positions counted by hand:
`truncated` counts every cut sample, `answers_truncated` only those that lost an answer token
(what decides whether mlan-train refuses a --max-length). A cut inside a trailing question
loses no answer; a cut inside an answer, or inside a question followed by an answer, does."""
import pytest

from mlan_kernels.data import IGNORE_INDEX, InstructionDataset, Record, WordTokenizer

Q1, A1, Q2, A2 = "what is two plus two ?", "four", "and the colour ?", "red , bright red"
# Token positions (one token per word), <s> at 0:
#   "user : what is two plus two ? assistant :" 1..10, "four </s>" 11..12,
#   "user : and the colour ? assistant :" 13..20, "red , bright red </s>" 21..25.
ENDS_WITH_QUESTION = [("human", Q1), ("gpt", A1), ("human", Q2)]            # 21 tokens
TWO_ANSWERS = [("human", Q1), ("gpt", A1), ("human", Q2), ("gpt", A2)]      # 26 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer.from_texts(["user : assistant :", Q1, A1, Q2, A2])


def counts(tokenizer, turns, max_length):
    dataset = InstructionDataset([Record("r", turns)], tokenizer, max_length=max_length)
    labels = dataset[0]["labels"]
    return dataset.truncated, dataset.answers_truncated, len(labels), int((labels != IGNORE_INDEX).sum())


def test_the_token_positions_are_as_counted(tokenizer):
    assert counts(tokenizer, ENDS_WITH_QUESTION, None) == (0, 0, 21, 2)
    assert counts(tokenizer, TWO_ANSWERS, None) == (0, 0, 26, 7)


@pytest.mark.parametrize("max_length", [13, 16, 20])
def test_a_cut_inside_a_trailing_question_loses_no_answer(tokenizer, max_length):
    assert counts(tokenizer, ENDS_WITH_QUESTION, max_length) == (1, 0, max_length, 2)


@pytest.mark.parametrize("max_length, kept", [(12, 1), (13, 2), (16, 2), (21, 2), (22, 3), (25, 6)])
def test_a_cut_that_drops_an_answer_token_counts(tokenizer, max_length, kept):
    """Inside the first answer (12 drops its </s>), just after it (13: the second answer is
    gone), inside the second question (16), at its end (21), inside the second answer (22, 25)."""
    assert counts(tokenizer, TWO_ANSWERS, max_length) == (1, 1, max_length, kept)


def test_a_dataset_counts_each_record_once(tokenizer):
    records = [Record("question", ENDS_WITH_QUESTION), Record("answers", TWO_ANSWERS),
               Record("short", [("human", Q2), ("gpt", A1)])]                  # 11 tokens: kept whole
    dataset = InstructionDataset(records, tokenizer, max_length=15)
    assert (dataset.truncated, dataset.answers_truncated) == (2, 1)
