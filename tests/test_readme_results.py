"""The README's results tables are rendered from benchmarks/results/*.json, never typed: this
fails when a table and its JSON disagree (fix: python -m mlan_bench.render --update-readme README.md)."""
import os

from mlan_bench.render import BLOCK, render_blocks

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_readme_results_blocks_match_their_json():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    blocks = BLOCK.findall(text)
    assert len(blocks) >= 2, "README lost its results blocks"
    assert render_blocks(text, ROOT) == text, (
        "README results tables differ from the JSON; run "
        "python -m mlan_bench.render --update-readme README.md")


def test_a_changed_number_is_detected():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    start = text.index("| mm_adapter |")
    tampered = text[:start] + text[start:].replace("| ok |", "| ok? |", 1)
    assert render_blocks(tampered, ROOT) != tampered
