"""The semantic mutant list (tests/semantic_mutants.json, run by `make mutation-semantic`) stays
applicable: every snippet occurs exactly once in its file, and the list's checks refuse a
snippet that is missing or ambiguous, a duplicate id and a missing test file."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("mlan_kernels/ops/", "mlan_kernels/backends/", "mlan_kernels/reference/", "mlan_kernels/functional.py",
          "mlan_kernels/modules.py", "mlan_kernels/integrations/", "mlan_kernels/integrations/checkpoint.py",
          "mlan_kernels/data/", "mlan_kernels/training/", "mlan_train/trainer.py", "mlan_bench/")


def runner():
    spec = importlib.util.spec_from_file_location("mutation_semantic", ROOT / "python" / "mutation_semantic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_to_the_tree_exactly_once():
    mutants = runner().load_mutants()
    assert len(mutants) >= 40
    for mutant in mutants:
        text = (ROOT / mutant["file"]).read_text(encoding="utf-8")
        assert text.count(mutant["original"]) == 1, mutant["id"]
    files = [mutant["file"] for mutant in mutants]
    assert all(any(f.startswith(layer) for f in files) for layer in LAYERS)


def write(path, mutants):
    path.write_text(json.dumps(mutants), encoding="utf-8")
    return path


def mutant(**changes):
    return {"id": "m", "file": "mlan_train/evaluate.py", "original": "def answer_mask(",
            "replacement": "def answer_mask_(", "bug": "renamed", "tests": ["tests/test_bookkeeping_accuracy.py"],
            **changes}


@pytest.mark.parametrize("entries, message", [
    ([mutant(original="no such text")], "the original occurs 0 times in mlan_train/evaluate.py"),
    ([mutant(original="assembled_labels")], "the original occurs"),
    ([mutant(), mutant()], "mutant id 'm' appears twice"),
    ([mutant(tests=["tests/test_missing.py"])], "no test file tests/test_missing.py"),
    ([mutant(file="mlan_train/missing.py")], "no file mlan_train/missing.py"),
    ([mutant(replacement="def answer_mask(")], "replacement equals the original"),
    ([mutant(bug="two\nlines")], "bug must be one line"),
    ([{"id": "m"}], "expected exactly the fields"),
])
def test_a_broken_mutant_list_is_refused_naming_the_mutant(tmp_path, entries, message):
    with pytest.raises(ValueError, match=message):
        runner().load_mutants(write(tmp_path / "mutants.json", entries))
