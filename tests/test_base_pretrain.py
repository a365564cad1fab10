"""Stage 1 of the demo (mlan_train/base.py): the statements are true and
in the vocabulary, the scenes' labels match their pixels, the base is made once, reused,
refused when it was made otherwise, never left half-written, and learns with a real budget."""
import json
import re

import numpy as np
import pytest
import torch

from mlan_kernels.data.synthetic import (COLOURS, NUMBERS, SHAPES, SIDES, TASKS, statements,
                                         vocabulary_texts)
from mlan_kernels.data.tokenizer import WordTokenizer
from mlan_train import base
from mlan_train.base import ATTRIBUTES, BaseSettings, pretrained_base, scenes

TINY = BaseSettings(dim=16, layers=1, heads=2, clip_dim=16, clip_layers=4, text_steps=2,
                    vision_steps=2, batch_size=4)


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer.from_texts(vocabulary_texts())


def test_statements_are_true_deterministic_and_in_the_vocabulary(tokenizer):
    texts = statements(400, seed=5)
    assert texts == statements(400, seed=5) and texts != statements(400, seed=6)
    kinds = set()
    for text in texts:
        assert tokenizer.unk_id not in tokenizer.encode(text), text
        words = text.split()
        if "user" in words:                    # "<3 attributes> . user : <question> assistant : <answer>"
            kinds.add("described")
            scene, question, answer = words[:3], " ".join(words[6:-3]), words[-1]
            assert words[3:6] == [".", "user", ":"] and words[-3:-1] == ["assistant", ":"], text
            task = next(t for t in TASKS if t.modality == "image" and question in t.templates)
            attribute = {"colour": COLOURS, "shape": SHAPES, "side": SIDES}[task.name]
            assert [w for w in scene if w in attribute] == [answer], text
            assert sorted(map(len, (set(scene) & set(COLOURS), set(scene) & set(SHAPES),
                                    set(scene) & set(SIDES)))) == [1, 1, 1], text
            continue
        numbers = [NUMBERS.index(word) for word in words if word in NUMBERS]
        if "plus" in words or "make" in words:
            kinds.add("add")
            assert numbers[0] + numbers[1] == numbers[2], text
        elif "bigger" in words:
            kinds.add("bigger")
            assert numbers[0] > numbers[1], text
        elif "less" in words:
            kinds.add("bigger")
            assert numbers[0] < numbers[1], text
        elif re.fullmatch(r"(the word )?(\w+) (,|\. again :) \2 \.", text):
            kinds.add("repeat")
        else:
            kinds.add("scene")
            assert len(set(words) & set(COLOURS)) == len(set(words) & set(SHAPES)) == 1, text
            assert ("on" in words) == (len(set(words) & set(SIDES)) == 1), text
    assert kinds == {"add", "bigger", "repeat", "scene", "described"}


def test_statements_of_chosen_kinds_and_bad_kinds():
    texts = statements(50, seed=1, kinds=("described",))
    assert all("assistant :" in text for text in texts)
    assert statements(50, seed=1, kinds=("add",)) != statements(50, seed=1, kinds=("repeat",))
    weighted = statements(900, seed=2, kinds=("add", "described", "described"))
    share = sum("assistant :" in text for text in weighted) / 900
    assert abs(share - 2 / 3) < 0.05, share                 # a kind listed twice: twice as often
    for bad in ((), ("scene", "poem")):
        with pytest.raises(ValueError, match=r"kinds must be a non-empty subset of \('add'"):
            statements(5, kinds=bad)


def test_last_word_accuracy_scores_the_last_word_not_the_period(tokenizer):
    """A model that always predicts "." scores 0; one that predicts each text's last word
    (before an optional " .") from the token before it scores 1."""
    texts = ["three plus four is seven .", "red left circle . user : what shape is this ? assistant : circle"]
    input_ids, _ = base._encode(texts, tokenizer)
    period = tokenizer.encode(".")[0]

    class Oracle(torch.nn.Module):
        def __init__(self, targets):
            super().__init__()
            self.targets = targets                      # [B, T] token to predict at t

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, tokenizer.vocab_size)
            logits.scatter_(2, self.targets[..., None], 1.0)
            return type("Out", (), {"logits": logits})

    always_period = torch.full_like(input_ids, period)
    assert base.last_word_accuracy(Oracle(always_period), texts, tokenizer) == 0.0
    next_token = torch.roll(input_ids, -1, dims=1)
    assert base.last_word_accuracy(Oracle(next_token), texts, tokenizer) == 1.0


def test_scene_labels_match_the_pixels():
    """Colour = nearest named colour of the bright pixels; side = the half holding the
    centre of their bounding box (measured on the normalized pixels, undoing CLIP's normalization)."""
    from mlan_kernels.data.dataset import CLIP_MEAN, CLIP_STD
    pixels, labels = scenes(60, TINY, seed=2)
    assert pixels.shape == (60, 3, 28, 28) and pixels.dtype == torch.float32
    rgb = (pixels * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]) * 255
    for i in range(60):
        image = rgb[i].permute(1, 2, 0).numpy()
        bright = image.max(axis=2) > 100
        _, cols = np.nonzero(bright)
        mean = image[bright].mean(axis=0)
        colour = min(COLOURS, key=lambda name: np.abs(np.asarray(COLOURS[name]) - mean).sum())
        assert ATTRIBUTES["colour"][labels["colour"][i]] == colour
        centre = (cols.min() + cols.max() + 1) / 2 / 28
        assert ATTRIBUTES["side"][labels["side"][i]] == ("left" if centre < 0.5 else "right")
    assert set(labels["shape"].tolist()) == {0, 1, 2}


def test_the_base_is_made_once_and_reused(tmp_path, tokenizer):
    lines = []
    record = pretrained_base(tmp_path / "base", tokenizer, TINY, log=lines.append)
    assert record["reused"] is False
    assert {p.name for p in (tmp_path / "base").iterdir()} == {"llama", "clip", "base.json"}
    assert set(record["clip"]["held_out_accuracy"]) == set(ATTRIBUTES)
    stamp = (tmp_path / "base" / "llama" / "model.safetensors").stat().st_mtime_ns
    again = pretrained_base(tmp_path / "base", tokenizer, TINY, log=lines.append)
    assert again["reused"] is True and "reusing" in lines[-1]
    assert (tmp_path / "base" / "llama" / "model.safetensors").stat().st_mtime_ns == stamp
    from transformers import CLIPVisionModel, LlamaForCausalLM
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "base" / "llama")
    assert llama.config.vocab_size == tokenizer.vocab_size
    assert CLIPVisionModel.from_pretrained(tmp_path / "base" / "clip").config.hidden_size == 16
    assert WordTokenizer.load(tmp_path / "base" / "llama" / "tokenizer.json").vocab_size == \
        tokenizer.vocab_size


def test_a_base_made_otherwise_is_refused_not_overwritten(tmp_path, tokenizer):
    pretrained_base(tmp_path / "base", tokenizer, TINY, log=lambda line: None)
    before = (tmp_path / "base" / "base.json").read_text()
    other = BaseSettings(**{**TINY.__dict__, "seed": 1})
    with pytest.raises(ValueError, match="^base directory .* holds something other"):
        pretrained_base(tmp_path / "base", tokenizer, other, log=lambda line: None)
    assert (tmp_path / "base" / "base.json").read_text() == before


def test_a_base_of_an_older_recipe_is_refused(tmp_path, tokenizer, monkeypatch):
    """A cache made before the stage-1 data changed (older RECIPE) is not reused silently."""
    pretrained_base(tmp_path / "base", tokenizer, TINY, log=lambda line: None)
    monkeypatch.setattr(base, "RECIPE", base.RECIPE + 1)
    with pytest.raises(ValueError, match="settings, vocabulary and recipe"):
        pretrained_base(tmp_path / "base", tokenizer, TINY, log=lambda line: None)


def test_a_failure_while_pretraining_leaves_no_directory(tmp_path, tokenizer, monkeypatch):
    def broken(settings, progress=False):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(base, "pretrain_clip", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        pretrained_base(tmp_path / "base", tokenizer, TINY, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_real_budget_learns_the_facts_and_the_attributes(tokenizer):
    """Small models, a budget of seconds: the LM predicts the last word of sums and repeats
    far above chance (1/10, 1/16; the described scenes need the demo's budget), and the vision
    tower separates colour and side far above chance (1/6 and 1/2)."""
    torch.manual_seed(0)
    settings = BaseSettings(dim=32, layers=1, heads=2, clip_dim=32, clip_layers=2,
                            text_steps=300, vision_steps=150, batch_size=32, lr=1e-2)
    _, llama_stats = base.pretrain_llama(settings, tokenizer)
    _, clip_stats = base.pretrain_clip(settings)
    words = llama_stats["held_out_last_word_accuracy"]
    assert set(words) == {"add", "repeat", "described"}, words
    assert words["add"] > 0.6 and words["repeat"] > 0.6, words
    accuracy = clip_stats["held_out_accuracy"]
    assert accuracy["colour"] > 0.6 and accuracy["side"] > 0.8, accuracy
    assert json.dumps(llama_stats) and json.dumps(clip_stats)


def test_mlan_train_base_pretrains_once_then_trains_only_adapters(tmp_path):
    """`mlan-train --base DIR`: stage 1 writes DIR, stage 2 trains adapters, neck and modality
    token on the frozen base, records the trainable share; a second run reuses DIR."""
    from safetensors.torch import load_file
    from mlan_kernels.data.synthetic import make_synthetic
    from mlan_train.cli import main
    data = tmp_path / "data"
    make_synthetic(data, train_size=80, eval_size=16, seed=3)
    tiny = ["--data", str(data), "--base", str(tmp_path / "base"), "--base-steps", "2",
            "--dim", "16", "--layers", "1", "--heads", "2", "--clip-dim", "16", "--steps", "2",
            "--batch-size", "4", "--warmup-steps", "0", "--no-progress", "--no-plots",
            "--eval-samples", "4"]
    assert main([*tiny, "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["train_base"] is False
    assert run["config"]["llama"] == str(tmp_path / "base" / "llama")
    trained = load_file(tmp_path / "run" / "checkpoint" / "trainable.safetensors")
    assert trained and all("adapter" in name or name.startswith(("neck.", "modality_embedding."))
                           for name in trained)
    parameters = run["parameters"]
    assert parameters["trainable"] == sum(t.numel() for t in trained.values()) < parameters["total"]
    stamp = (tmp_path / "base" / "base.json").stat().st_mtime_ns
    assert main([*tiny, "--seed", "1", "--out", str(tmp_path / "again")]) == 0   # stage 2's seed
    assert (tmp_path / "base" / "base.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "again" / "run.json").read_text())["config"]["seed"] == 1
    assert main([*tiny, "--base-seed", "1", "--out", str(tmp_path / "other")]) == 2  # another base
    assert (tmp_path / "base" / "base.json").stat().st_mtime_ns == stamp


def test_base_and_llama_together_are_refused(tmp_path, capsys):
    from mlan_train.cli import main
    assert main(["--data", str(tmp_path), "--base", str(tmp_path / "b"), "--llama",
                 str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "--base" in capsys.readouterr().err
