"""`mlan-train` on data as LLaVA users have it: a LLaVA .json list with images in a separate
folder, a local HF LLaMA whose tokenizer has a chat template, a CLIP with its image processor;
held-out split, one-line data report, refused paths, --predict, run.json's real model sizes,
the by-task summary with both modalities, plots skipped without matplotlib, --clip-every."""
import json
import sys

import pytest

from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_train.cli import accuracy_by_task, format_table, main
from user_data import llava_dataset, tiny_hf_tokenizer

pytest.importorskip("transformers")
FAST = ["--steps", "3", "--warmup-steps", "0", "--batch-size", "2", "--probe-every", "0",
        "--language-share", "0.5", "--no-progress", "--max-length", "32"]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """{"data", "images", "llama", "clip", "questions"} paths of a user's setup."""
    from transformers import CLIPImageProcessor
    root = tmp_path_factory.mktemp("user")
    data, images = llava_dataset(root, count=24)
    records = json.loads(data.read_text())
    records.append({"id": "escape", "image": "../data/llava.json", "conversations": records[0]["conversations"]})
    records.append({"id": "passwd", "image": "/etc/passwd", "conversations": records[0]["conversations"]})
    data.write_text(json.dumps(records))
    tokenizer = tiny_hf_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), hidden_size=48).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    tiny_clip(layers=4, image_size=28).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(root / "clip")
    questions = root / "questions.json"
    questions.write_text(json.dumps([{"id": "q1", "question": "what colour is the square ?", "image": "0.png"},
                                     {"id": "q2", "question": "say hello"},
                                     {"id": "q3", "question": "say hello", "image": "../secret.png"}]))
    return {"data": data, "images": images, "llama": root / "llama", "clip": root / "clip",
            "questions": questions}


def run(user, out, *extra):
    return main(["--data", str(user["data"]), "--image-folder", str(user["images"]), "--llama", str(user["llama"]),
                 "--clip", str(user["clip"]), "--out", str(out), *FAST, *extra])


@pytest.mark.filterwarnings("ignore:.*skipping")
def test_a_llava_json_with_an_image_folder_trains_and_answers(user, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # blocked: plots skipped
    assert run(user, tmp_path, "--eval-fraction", "0.25", "--predict", str(user["questions"]),
               "--clip-every", "2") == 0
    printed = capsys.readouterr().out
    assert ("data: llava.json: 24 records (12 with images), 2 skipped (image_absolute 1, "
            "image_outside_folder 1); 6 of them held out (--eval-fraction 0.25)") in printed
    assert printed.count("plots skipped: matplotlib is not installed") == 1
    assert not (tmp_path / "loss.png").exists()
    summary = json.loads((tmp_path / "run.json").read_text())
    model = summary["model"]
    assert (model["llama"], model["clip"]) == (str(user["llama"]), str(user["clip"]))
    assert (model["dim"], model["clip_layers"], model["image_tokens"], model["vocab_size"]) == (48, 4, 2, 27)
    assert model["template"] == "chat" and model["image_processor"].startswith("CLIPImageProcessor")
    assert (summary["config"]["dim"], summary["config"]["clip_dim"]) == (48, 32)
    assert summary["data"]["train_samples"] == 18 and summary["data"]["eval_samples"] == 6
    final = summary["final_eval"]
    assert final["text"]["samples"] + final["image"]["samples"] == 6
    assert f"share 0.5 by task: text all {final['text']['accuracy']:.0%}, image all " in printed
    answers = json.loads((tmp_path / "predictions.json").read_text())
    assert [a["id"] for a in answers] == ["q1", "q2", "q3"]
    assert isinstance(answers[0]["answer"], str) and isinstance(answers[1]["answer"], str)
    assert answers[2]["answer"] is None and "outside the image folder" in answers[2]["error"]
    # a finished run answers again from its checkpoint: the same model, the same greedy answers
    (tmp_path / "predictions.json").rename(tmp_path / "first.json")
    assert run(user, tmp_path, "--eval-fraction", "0.25", "--predict", str(user["questions"]),
               "--clip-every", "2", "--resume", str(tmp_path / "checkpoint")) == 0
    assert json.loads((tmp_path / "predictions.json").read_text()) == answers


def test_the_by_task_summary_keeps_both_modalities():
    final = {"text": {"accuracy": 0.5, "by_task": {"all": 0.5}},
             "image": {"accuracy": 1.0, "by_task": {"all": 1.0}}}
    assert accuracy_by_task(final) == {"text all": 0.5, "image all": 1.0}
    synthetic = {"text": {"by_task": {"add": 0.25}}, "image": {"by_task": {"colour": 0.75}}}
    assert accuracy_by_task(synthetic) == {"add": 0.25, "colour": 0.75}
    row = {"share": 0.5, "text_accuracy": 0.5, "image_accuracy": 1.0, "final_loss": 1.0, "tokens_per_s": 1.0,
           "padding_ratio": 0.0, "image_token_share": 0.1, "kappa_ema": None, "probe_s": None,
           "peak_memory_mb": 1.0, "parameters": {"trainable": 1, "total": 2},
           "by_task": accuracy_by_task(final)}
    assert "share 0.5 by task: text all 50%, image all 100%" in format_table([row], {})


@pytest.mark.parametrize("extra, message", [
    (["--eval-data", "x.json", "--eval-fraction", "0.1"], "--eval-data and --eval-fraction both"),
    (["--template", "chatml"], "--template must be 'auto' or 'chat' or 'mlan'"),
    (["--eval-fraction", "1"], "--eval-fraction must be finite and in [0, 1), got 1.0"),
    (["--image-folder", "/nonexistent-folder"], "--image-folder /nonexistent-folder: not a directory"),
    (["--template", "vicuna_v1", "--strict-vocab"], "words of template 'vicuna_v1'"),
])
def test_user_errors_are_one_line_exit_2(user, tmp_path, capsys, extra, message):
    assert run(user, tmp_path, *extra) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mlan-train: error: ") and message in error and "\n" not in error


def test_data_as_a_missing_path_or_a_directory_without_train_file(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    assert main(["--data", str(tmp_path / "dir"), "--out", str(tmp_path / "o")]) == 2
    assert "no train.json or train.jsonl" in capsys.readouterr().err
