"""WordTokenizer: fixed special ids, deterministic vocabulary, round trip, save/load."""
import pytest

from mlan_kernels.data import WordTokenizer

TEXTS = ["What is three plus four?", "Repeat the word: apple", "user : assistant :"]


def test_special_ids_are_fixed():
    tokenizer = WordTokenizer.from_texts(TEXTS)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    vocab = tokenizer.tokenizer.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]


def test_vocabulary_is_sorted_words_and_punctuation():
    tokenizer = WordTokenizer.from_texts(TEXTS)
    words = sorted(["what", "is", "three", "plus", "four", "?", "repeat", "the", "word", ":",
                    "apple", "user", "assistant"])
    vocab = tokenizer.tokenizer.get_vocab()
    assert sorted(vocab, key=vocab.get)[4:] == words
    assert tokenizer.vocab_size == 4 + len(words)
    assert WordTokenizer.from_texts(reversed(TEXTS)).tokenizer.get_vocab() == vocab


def test_round_trip_lowercases_and_splits_punctuation():
    tokenizer = WordTokenizer.from_texts(TEXTS)
    ids = tokenizer.encode("WHAT is  three plus four?")
    assert len(ids) == 6 and tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == "what is three plus four ?"


def test_unknown_words_and_specials_in_text():
    tokenizer = WordTokenizer.from_texts(TEXTS)
    ids = tokenizer.encode("apple banana <s>")
    assert ids[0] == tokenizer.encode("apple")[0] and ids[1] == tokenizer.unk_id
    assert tokenizer.bos_id not in ids                     # "<s>" in data is not a control token
    wrapped = [tokenizer.bos_id] + tokenizer.encode("the word") + [tokenizer.eos_id, 0, 0]
    assert tokenizer.decode(wrapped) == "the word"


def test_save_load_keeps_ids(tmp_path):
    tokenizer = WordTokenizer.from_words(["zebra", "Apple", "mango"])
    tokenizer.save(tmp_path / "sub" / "tokenizer.json")
    loaded = WordTokenizer.load(tmp_path / "sub" / "tokenizer.json")
    assert loaded.tokenizer.get_vocab() == tokenizer.tokenizer.get_vocab()
    assert loaded.encode("apple mango zebra") == [4, 5, 6]


def test_bad_words_and_bad_special_ids_rejected():
    with pytest.raises(ValueError, match="words"):
        WordTokenizer.from_words(["two words"])
    from tokenizers import Tokenizer, models
    wrong = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3},
                                       unk_token="<unk>"))
    with pytest.raises(ValueError, match="'<pad>' to id 0"):
        WordTokenizer(wrong)
