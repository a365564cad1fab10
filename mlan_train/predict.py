"""`mlan-train --predict FILE`: answer a JSON file of questions with the model just trained (or
resumed), with the training template, image preprocessing and EOS (data/inference.py).

FILE: a JSON list; each item {"id", "question", "image" (optional)} or a LLaVA record (the
first human turn is the question). Image paths follow the training data's rules: relative to
--image-folder (default: FILE's directory), never outside it, absolute only with
--allow-absolute-image-paths; an item whose image is refused or unreadable is answered with
"answer": null and an "error". Writes OUT/predictions.json: [{"id", "question", "image",
"answer"}] in FILE's order.
"""
import json
import os
from pathlib import Path

from mlan_kernels.data.inference import Answerer
from mlan_kernels.data.records import IMAGE_PLACEHOLDER, confined_image_path


def read_questions(path, image_folder=None, allow_absolute: bool = False) -> list:
    """[{"id", "question", "image": resolved path or None, "error": str or None}] of FILE.
    ValueError naming the file when it is not a JSON list of objects with a question."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        try:
            items = json.load(handle)
        except ValueError as error:
            raise ValueError(f"--predict {path}: not JSON ({error})") from error
    if not isinstance(items, list):
        raise ValueError(f"--predict {path}: expected a JSON list of questions, got {type(items).__name__}")
    root = Path(image_folder) if image_folder else path.parent
    questions = []
    for number, item in enumerate(items):
        question = item.get("question") if isinstance(item, dict) else None
        if isinstance(item, dict) and question is None and isinstance(item.get("conversations"), list):
            question = next((turn.get("value") for turn in item["conversations"]
                             if isinstance(turn, dict) and turn.get("from") in ("human", "user")), None)
        if not isinstance(question, str):
            raise ValueError(f"--predict {path}: item {number} needs a string \"question\" (or a "
                             f"LLaVA \"conversations\" list with a human turn)")
        entry = {"id": str(item.get("id", number)),
                 "question": question.replace(IMAGE_PLACEHOLDER, "").strip(),
                 "image": None, "error": None}
        if item.get("image") is not None:
            try:
                entry["image"] = str(confined_image_path(item["image"], root, allow_absolute))
            except ValueError as error:                     # BadRecord: outside, absolute, ...
                entry["error"] = str(error)
        questions.append(entry)
    return questions


def write_predictions(trainer, path, out_dir) -> str:
    """Answer FILE's questions with trainer's model; returns the path of predictions.json."""
    config = trainer.config
    questions = read_questions(path, config.image_folder, config.allow_absolute_image_paths)
    answerer = Answerer(trainer.module, trainer.tokenizer, trainer.train_set.template,
                        trainer.image_processor, trainer.train_set.image_size)
    for entry in questions:
        if entry["image"] is not None and entry["error"] is None:
            try:
                answerer.pixels(entry["image"])             # refuse unreadable images one by one
            except Exception as error:                      # PIL raises many types
                entry["error"] = f"image unreadable ({error})"
    usable = [entry for entry in questions if entry["error"] is None]
    answers = answerer.answer([entry["question"] for entry in usable], [entry["image"] for entry in usable],
                              max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    for entry, answer in zip(usable, answers):
        entry["answer"] = answer
    for entry in questions:
        entry.setdefault("answer", None)
        if entry["error"] is None:
            del entry["error"]
    target = os.path.join(out_dir, "predictions.json")
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(questions, handle, indent=1)
    return target
