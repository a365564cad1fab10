"""The code blocks of README.md and python/README.md run as written.

Each file's ```python and ```bash blocks run top to bottom as one session (Python blocks
share one namespace), in a temporary working directory that holds the fixture the README
describes:
- llama-7b-hf/: a tiny random LlamaForCausalLM (integrations/tiny.py) saved with
  save_pretrained, with the synthetic task's tokenizer as a PreTrainedTokenizerFast whose chat
  template (CHAT_TEMPLATE) writes the synthetic task's words;
- clip-vit-large-patch14/: a tiny random CLIPVisionModel (28 px images), save_pretrained;
- llava-1.5-7b-hf/: a tiny random LlavaForConditionalGeneration (image token 127), save_pretrained;
- data/synthetic/: make_synthetic with 400 train and 40 held-out records;
- my-data/llava.json + my-images/: the same training records as one LLaVA .json list whose
  image paths are relative to the separate image folder, and my-data/questions.json (the
  held-out questions, one with an image, one without).
A bash line must be one of our commands: a console script of pyproject.toml, `python
python/<program>.py ...` (resolved against the repository) or `python -m mlan_kernels...`.
It runs in this process with sys.argv set and must exit with status 0. A block preceded by
`<!-- snippet: skip (reason) -->` is not run: the test counts those, requires the reason and
compares the count with SKIPPED, so no block is skipped silently.
"""
import contextlib
import importlib
import io
import os
import re
import runpy
import shlex
import sys
import tomllib

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
    SCRIPTS = tomllib.load(handle)["project"]["scripts"]
BLOCK = re.compile(r"(?:<!-- snippet: skip \((?P<reason>[^)]+)\) -->\n)?```(?P<lang>python|bash)\n"
                   r"(?P<code>.*?)```", re.S)
SKIPPED = {"README.md": 3, "python/README.md": 1}   # blocks marked skip, each with its reason


def blocks(path):
    """[(language, code, skip reason or None)] of a Markdown file, in order."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        text = handle.read()
    return [(match["lang"], match["code"], match["reason"]) for match in BLOCK.finditer(text)]


def commands(code):
    """The command lines of a bash block: comments dropped, backslash continuations joined."""
    joined = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def run_command(words):
    """Run one of our commands in this process; its exit status must be 0."""
    old_argv = sys.argv
    try:
        if words[0] in SCRIPTS:
            module_name, function_name = SCRIPTS[words[0]].split(":")
            sys.argv = words
            main = getattr(importlib.import_module(module_name), function_name)
            status = main(words[1:])
        elif words[:2] == ["python", "-m"]:
            sys.argv = words[2:]
            status = _exit_status(lambda: runpy.run_module(words[2], run_name="__main__",
                                                           alter_sys=True))
        elif words[0] == "python" and words[1].startswith("python/"):
            path = os.path.join(ROOT, words[1])
            sys.argv = [path] + words[2:]
            status = _exit_status(lambda: runpy.run_path(path, run_name="__main__"))
        else:
            raise AssertionError(f"{' '.join(words)}: not a command of ours; mark its block "
                                 f"<!-- snippet: skip (reason) --> if it cannot run here")
    finally:
        sys.argv = old_argv
    assert status in (0, None), f"{' '.join(words)} exited with {status}"


def _exit_status(call):
    try:
        call()
    except SystemExit as exit_:
        return exit_.code
    return 0


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}user : "
                 "{{ m['content'] }} assistant :{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
                 "{% endfor %}")


def _llava_copy(synthetic, data, images):
    """data/llava.json (a list) + the image folder `images` from the synthetic train.jsonl, and
    data/questions.json from two held-out records."""
    import json
    import shutil
    os.makedirs(data)
    os.makedirs(images)
    records = []
    with open(os.path.join(synthetic, "train.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if "image" in record:
                name = os.path.basename(record["image"])
                shutil.copy(os.path.join(synthetic, record["image"]), os.path.join(images, name))
                record["image"] = name
            records.append(record)
    with open(os.path.join(data, "llava.json"), "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    with open(os.path.join(synthetic, "eval.jsonl"), encoding="utf-8") as handle:
        held_out = [json.loads(line) for line in handle]
    picked = [next(r for r in held_out if "image" in r), next(r for r in held_out if "image" not in r)]
    questions = []
    for record in picked:
        entry = {"id": record["id"], "question": record["conversations"][0]["value"]}
        if "image" in record:
            entry["image"] = os.path.basename(record["image"])
            shutil.copy(os.path.join(synthetic, record["image"]), os.path.join(images, entry["image"]))
        questions.append(entry)
    with open(os.path.join(data, "questions.json"), "w", encoding="utf-8") as handle:
        json.dump(questions, handle)


@pytest.fixture
def fixture_directory(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast
    from mlan_kernels.data import make_synthetic
    from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama, tiny_vision_language_model
    monkeypatch.chdir(tmp_path)
    make_synthetic("data/synthetic", train_size=400, eval_size=40)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file="data/synthetic/tokenizer.json",
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained("llama-7b-hf")
    tokenizer.save_pretrained("llama-7b-hf")
    _llava_copy("data/synthetic", "my-data", "my-images")
    tiny_clip().save_pretrained("clip-vit-large-patch14")
    tiny_vision_language_model("llava").save_pretrained("llava-1.5-7b-hf")
    state = torch.get_rng_state(), torch.get_num_threads()
    yield tmp_path
    torch.set_rng_state(state[0])
    torch.set_num_threads(state[1])


@pytest.mark.parametrize("path", sorted(SKIPPED))
def test_readme_blocks_run_as_written(path, fixture_directory, capsys):
    pytest.importorskip("accelerate")        # the Trainer block (extra [hf])
    pytest.importorskip("matplotlib")        # the plot command (extra [bench])
    namespace, skipped = {"__name__": "__readme__"}, 0
    for index, (language, code, reason) in enumerate(blocks(path)):
        if reason is not None:
            skipped += 1
            continue
        where = f"{path} block {index + 1} ({language})"
        if language == "python":
            exec(compile(code, where, "exec"), namespace)
        else:
            for words in commands(code):
                run_command(words)
    assert skipped == SKIPPED[path], f"{path}: {skipped} blocks marked skip, expected {SKIPPED[path]}"


def test_the_block_parser_sees_skip_markers_and_continuations():
    text = ("<!-- snippet: skip (needs CUDA) -->\n```bash\nmake x\n```\n"
            "```python\nx = 1\n```\n```bash\nmlan-bench --a \\\n  --b  # note\n```\n")
    found = [(match["lang"], match["code"], match["reason"]) for match in BLOCK.finditer(text)]
    assert [(language, reason) for language, _, reason in found] == [
        ("bash", "needs CUDA"), ("python", None), ("bash", None)]
    assert commands(found[2][1]) == [["mlan-bench", "--a", "--b"]]
