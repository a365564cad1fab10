"""A synthetic MLAN-style mixture a tiny model learns in minutes on CPU (no downloads).

Every answer is one word, so accuracy = exact match of the answer word. The eval split holds
fresh random instances of the same tasks (same templates and value ranges as train).
Text tasks:  add     "what is three plus four ?" -> "seven"      (a in 0..5, b in 0..4)
             bigger  "which is bigger : three or seven ?" -> "seven"
             repeat  "repeat the word : apple" -> "apple"
Image tasks (dark background, one filled shape, its centre clearly left or right of the middle):
             colour  "what colour is the shape ?" -> one of 6 colours
             shape   "what shape is this ?" -> circle / square / triangle
             side    "is the shape on the left or the right ?" -> left / right
Chance (meta.json "tasks"[t]["chance"]): 1/|answers|, except bigger: 1/2 (one of the two numbers
asked about). Per modality: the mean over its tasks weighted by their eval frequency.
Record ids are "{split}-{index:05d}-{task}" (see task_from_id).
"""
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from .checks import check_fraction, check_int
from .templates import PROMPT_TEMPLATE
from .tokenizer import WordTokenizer

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NOUNS = ("apple", "bread", "candle", "chair", "cloud", "garden", "horse", "house", "lemon",
         "piano", "pencil", "river", "rocket", "stone", "tiger", "window")
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 70, 235),
           "yellow": (235, 225, 35), "white": (240, 240, 240), "magenta": (225, 40, 225)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Scene:
    """One generated image: colour name, shape name, top-left corner and side length of the
    shape, and the image's side length, in pixels."""
    colour: str
    shape: str
    left: int
    top: int
    size: int
    image_size: int

    @property
    def side(self) -> str:
        """"left" or "right": the half of the image that holds the shape's centre."""
        return SIDES[int(2 * self.left + self.size > self.image_size)]


@dataclass(frozen=True)
class Task:
    """ask(rng, scene) -> (template fields, answer word); scene is None for text tasks."""
    name: str
    modality: str                    # "text" or "image"
    templates: tuple[str, ...]
    answers: tuple[str, ...]
    chance: float
    ask: Callable[[np.random.Generator, Optional[Scene]], tuple[dict, str]]


def _ask_add(rng, scene):
    a, b = int(rng.integers(0, 6)), int(rng.integers(0, 5))
    return {"a": NUMBERS[a], "b": NUMBERS[b]}, NUMBERS[a + b]


def _ask_bigger(rng, scene):
    a, b = (int(x) for x in rng.choice(len(NUMBERS), size=2, replace=False))
    return {"a": NUMBERS[a], "b": NUMBERS[b]}, NUMBERS[max(a, b)]


def _ask_repeat(rng, scene):
    word = NOUNS[int(rng.integers(len(NOUNS)))]
    return {"word": word}, word


TASKS = (
    Task("add", "text",
         ("what is {a} plus {b} ?", "add {a} and {b} .", "{a} plus {b} makes what ?"),
         NUMBERS, 1 / len(NUMBERS), _ask_add),
    Task("bigger", "text",
         ("which is bigger : {a} or {b} ?", "which number is larger , {a} or {b} ?"),
         NUMBERS, 1 / 2, _ask_bigger),
    Task("repeat", "text", ("repeat the word : {word}", "say the word {word} again .",
                            "copy this word : {word}"), NOUNS, 1 / len(NOUNS), _ask_repeat),
    Task("colour", "image", ("what colour is the shape ?", "what is the colour of the shape ?",
                             "which colour do you see ?"), tuple(COLOURS), 1 / len(COLOURS),
         lambda rng, scene: ({}, scene.colour)),
    Task("shape", "image", ("what shape is this ?", "which shape is in the picture ?",
                            "name the shape ."), SHAPES, 1 / len(SHAPES),
         lambda rng, scene: ({}, scene.shape)),
    Task("side", "image", ("is the shape on the left or the right ?",
                           "which side is the shape on , left or right ?",
                           "where is the shape : left or right ?"), SIDES, 1 / len(SIDES),
         lambda rng, scene: ({}, scene.side)),
)
TASKS_BY_NAME = {task.name: task for task in TASKS}
IMAGE_TASKS = tuple(task for task in TASKS if task.modality == "image")


# Statements about the same world, the text corpus of the demo's pretrained LLaMA (stage 1):
# the facts and words the tasks ask about. The text tasks never appear in their question/answer
# format (stage 2's adapters have to learn it); "described" (see _described) asks the image
# tasks' questions about a scene described in words, as a text-only LLM has read descriptions
# and questions about them: stage 2 learns to put the image where the words were (LLaVA's and
# LaVIN's premise).
STATEMENTS = {      # kind -> templates; the kinds of `statements` are these and "described"
    "add": ("{a} plus {b} is {c} .", "{a} and {b} make {c} ."),
    "bigger": ("{big} is bigger than {small} .", "{small} is less than {big} ."),
    "repeat": ("{word} , {word} .", "the word {word} . again : {word} ."),
    "scene": ("a {colour} {shape} on the {side} .", "the {shape} is {colour} .",
              "the {colour} {shape} is on the {side} ."),
}


def _described(rng: np.random.Generator) -> str:
    """'<colour, shape, side in random order> . user : <image task question> assistant : <answer>'.
    The random order makes the language model find an attribute by what the word is, not where
    it stands, so one image token can stand for the whole description."""
    fields = _statement_fields("scene", rng)
    words = [fields[name] for name in ("colour", "shape", "side")]
    description = " ".join(words[i] for i in rng.permutation(3)) + " ."
    task = IMAGE_TASKS[int(rng.integers(len(IMAGE_TASKS)))]
    question = task.templates[int(rng.integers(len(task.templates)))]
    return f"{description} {PROMPT_TEMPLATE.format(human=question)} {fields[task.name]}"


def _statement_fields(kind: str, rng: np.random.Generator) -> dict:
    if kind == "add":                                  # every sum up to nine
        a = int(rng.integers(0, 10))
        b = int(rng.integers(0, 10 - a))
        return {"a": NUMBERS[a], "b": NUMBERS[b], "c": NUMBERS[a + b]}
    if kind == "bigger":
        small, big = sorted(int(x) for x in rng.choice(len(NUMBERS), size=2, replace=False))
        return {"big": NUMBERS[big], "small": NUMBERS[small]}
    if kind == "repeat":
        return {"word": NOUNS[int(rng.integers(len(NOUNS)))]}
    return {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
            "side": str(rng.choice(SIDES))}


STATEMENT_KINDS = (*STATEMENTS, "described")


def statements(count: int, seed: int = 0, kinds: tuple = STATEMENT_KINDS) -> list[str]:
    """`count` random statements of `kinds` (each entry of `kinds` and each template equally
    likely: a kind listed twice is drawn twice as often), deterministic for the seed and kinds."""
    check_int("count", count)
    unknown = sorted(set(kinds) - set(STATEMENT_KINDS))
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {STATEMENT_KINDS}, got {tuple(kinds)}")
    rng = np.random.default_rng([seed, 7])
    kinds = list(kinds)
    texts = []
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "described":
            texts.append(_described(rng))
        else:
            templates = STATEMENTS[kind]
            texts.append(templates[int(rng.integers(len(templates)))]
                         .format(**_statement_fields(kind, rng)))
    return texts


def task_from_id(record_id: str) -> str:
    """Task name of a synthetic record id "{split}-{index}-{task}"."""
    return record_id.rsplit("-", 1)[-1]


def random_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """A shape of 40-60 % of the image side whose centre lies at least 1/8 of the image
    from the vertical middle line, so its side (left/right) is never ambiguous."""
    size = int(rng.integers(int(0.4 * image_size), int(0.6 * image_size) + 1))
    lefts = [left for left in range(1, image_size - size)
             if abs(2 * left + size - image_size) >= image_size / 4]
    left = lefts[int(rng.integers(len(lefts)))]
    top = int(rng.integers(1, image_size - size))
    return Scene(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), left, top, size,
                 image_size)


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """RGB image: dark random background, the scene's shape filled in its (jittered) colour."""
    background = tuple(int(x) for x in rng.integers(0, 40, size=3))
    colour = np.clip(np.asarray(COLOURS[scene.colour]) + rng.integers(-20, 21, size=3), 0, 255)
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    left, top = scene.left, scene.top
    right, bottom = left + scene.size - 1, top + scene.size - 1
    fill = tuple(int(x) for x in colour)
    if scene.shape == "circle":
        draw.ellipse([left, top, right, bottom], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([left, top, right, bottom], fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image


def _make_split(out_dir: Path, split: str, size: int, seed: int, image_size: int,
                image_fraction: float) -> Counter:
    """Write out_dir/{split}.jsonl (+ its PNGs); returns counts by modality and task."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    modalities = {"text": [t for t in TASKS if t.modality == "text"],
                  "image": [t for t in TASKS if t.modality == "image"]}
    image_count = round(image_fraction * size)
    is_image = rng.permutation(np.arange(size) < image_count)
    counts, lines = Counter(), []
    for index in range(size):
        modality = "image" if is_image[index] else "text"
        task = modalities[modality][int(rng.integers(len(modalities[modality])))]
        scene = random_scene(rng, image_size) if modality == "image" else None
        fields, answer = task.ask(rng, scene)
        question = task.templates[int(rng.integers(len(task.templates)))].format(**fields)
        record = {"id": f"{split}-{index:05d}-{task.name}", "task": task.name}
        if scene is not None:
            record["image"] = f"images/{split}_{index:05d}.png"
            render(scene, image_size, rng).save(out_dir / record["image"], compress_level=1)
            question = "<image>\n" + question
        record["conversations"] = [{"from": "human", "value": question},
                                   {"from": "gpt", "value": answer}]
        lines.append(json.dumps(record))
        counts[modality] += 1
        counts[task.name] += 1
    (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return counts


def vocabulary_texts() -> list[str]:
    """Every word the tasks, the statements and the prompt template can produce."""
    texts = [PROMPT_TEMPLATE.format(human="")]
    for task in TASKS:
        texts += [re.sub(r"\{\w+\}", " ", template) for template in task.templates]
        texts += list(task.answers)
    for templates in STATEMENTS.values():
        texts += [re.sub(r"\{\w+\}", " ", template) for template in templates]
    return texts + list(NUMBERS) + list(NOUNS)


def chance_levels(meta: dict, split: str = "eval") -> dict:
    """{"text": c, "image": c}: per modality, the task chances weighted by the split's counts."""
    counts = meta["splits"][split]["tasks"]
    levels = {}
    for modality in ("text", "image"):
        names = [name for name, task in meta["tasks"].items() if task["modality"] == modality]
        total = sum(counts.get(name, 0) for name in names)
        levels[modality] = (sum(meta["tasks"][name]["chance"] * counts.get(name, 0)
                                for name in names) / total if total else None)
    return levels


def make_synthetic(out_dir, train_size: int = 4000, eval_size: int = 400, seed: int = 0,
                   image_size: int = 28, image_fraction: float = 0.5) -> dict:
    """Write train.jsonl, eval.jsonl, images/*.png, tokenizer.json and meta.json to out_dir.

    Deterministic for (seed, sizes, image_size, image_fraction). Returns dict(train, eval,
    images, tokenizer, meta: paths as str; counts: {split: {"total", "text", "image", "tasks"}}).
    """
    check_int("train_size", train_size)
    check_int("eval_size", eval_size)
    check_int("image_size", image_size, minimum=8)
    image_fraction = check_fraction("image_fraction", image_fraction)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, size in zip(SPLITS, (train_size, eval_size)):
        counts = _make_split(out, split, size, seed, image_size, image_fraction)
        splits[split] = {"total": size, "text": counts["text"], "image": counts["image"],
                         "tasks": {task.name: counts[task.name] for task in TASKS}}
    WordTokenizer.from_texts(vocabulary_texts()).save(out / "tokenizer.json")
    meta = {"seed": seed, "image_size": image_size, "image_fraction": image_fraction,
            "prompt_template": PROMPT_TEMPLATE, "id_format": "{split}-{index:05d}-{task}",
            "splits": splits,
            "tasks": {task.name: {"modality": task.modality, "answers": list(task.answers),
                                  "chance": task.chance, "templates": list(task.templates)}
                      for task in TASKS}}
    meta["chance"] = chance_levels(meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    paths = {name: str(out / f"{name}.jsonl") for name in SPLITS}
    return {**paths, "images": str(out / "images"), "tokenizer": str(out / "tokenizer.json"),
            "meta": str(out / "meta.json"), "counts": splits}
