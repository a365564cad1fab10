"""load_records: good records load; every kind of bad record is skipped, counted and warned
about by id (or line), and loading never raises for a bad record."""
import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from mlan_kernels.data import load_records


def write_jsonl(path: Path, lines) -> Path:
    """Each item: a dict (dumped as JSON) or a raw string line."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def turn(role, value):
    return {"from": role, "value": value}


def good(record_id, image=None):
    record = {"id": record_id, "conversations": [turn("human", "<image>\nWhat is it?"),
                                                 turn("gpt", "A cat.")]}
    if image is not None:
        record["image"] = image
    return record


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def test_good_records_load(image_dir):
    aliases = {"id": "alias", "conversations": [turn("user", "hi"), turn("assistant", "hello"),
                                                turn("human", "again"), turn("gpt", "yes")]}
    path = write_jsonl(image_dir / "data.jsonl", [good("text"), good("img", "images/ok.png"),
                                                  aliases])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records, report = load_records(path)
    assert (report.loaded, report.skipped, report.reasons) == (3, 0, {})
    text, image, alias = records
    assert text.turns == [("human", "What is it?"), ("gpt", "A cat.")]
    assert not text.has_image and text.image is None
    assert image.has_image and image.image == str((image_dir / "images" / "ok.png").resolve())
    assert [role for role, _ in alias.turns] == ["human", "gpt", "human", "gpt"]


def test_json_list_and_image_root(image_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = elsewhere / "data.json"
    path.write_text(json.dumps([good("a", "images/ok.png"), good("b")]))
    records, report = load_records(path, image_root=image_dir)
    assert report.loaded == 2 and records[0].image.startswith(str(image_dir.resolve()))
    with pytest.warns(UserWarning, match="record 'a'.*image_missing"):
        _, report = load_records(path)                      # default root: the file's folder
    assert report.reasons == {"image_missing": 1}


BAD_RECORDS = {
    "not_json": "{this is not json",
    "not_object": [1, 2],
    "bad_conversations": {"id": "bad_conversations", "conversations": "hello"},
    "empty_conversation": {"id": "empty_conversation", "conversations": []},
    "bad_turn": {"id": "bad_turn", "conversations": [{"from": "human"}, turn("gpt", "x")]},
    "unknown_role": {"id": "unknown_role", "conversations": [turn("robot", "x"),
                                                             turn("gpt", "y")]},
    "no_gpt_turn": {"id": "no_gpt_turn", "conversations": [turn("human", "x")]},
    "first_turn_not_human": {"id": "first_turn_not_human",
                             "conversations": [turn("gpt", "x"), turn("human", "y")]},
    "image_missing": good("image_missing", "images/nope.png"),
    "image_unreadable": good("image_unreadable", "images/broken.png"),
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_counted_and_named(image_dir, reason):
    bad = BAD_RECORDS[reason]
    path = write_jsonl(image_dir / "data.jsonl", [good("first"), bad, good("last")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, report = load_records(path)
    assert [r.id for r in records] == ["first", "last"]
    assert (report.loaded, report.skipped, report.reasons) == (2, 1, {reason: 1})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and reason in messages[0]
    name = f"record {reason!r}" if isinstance(bad, dict) else "line 2"
    assert name in messages[0]


def test_many_bad_records_counted_by_reason(image_dir):
    lines = [good("ok")] + [BAD_RECORDS[r] for r in sorted(BAD_RECORDS)] + [BAD_RECORDS["bad_turn"]]
    path = write_jsonl(image_dir / "data.jsonl", lines)
    with pytest.warns(UserWarning):
        records, report = load_records(path)
    assert report.loaded == 1 and report.skipped == len(BAD_RECORDS) + 1
    assert report.reasons == {**{r: 1 for r in BAD_RECORDS}, "bad_turn": 2}


def test_check_images_false_skips_image_checks(image_dir):
    path = write_jsonl(image_dir / "data.jsonl", [BAD_RECORDS["image_missing"]])
    records, report = load_records(path, check_images=False)
    assert report.loaded == 1 and records[0].image.endswith("nope.png")


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("id\n")
    with pytest.raises(ValueError, match=r"\.json or \.jsonl"):
        load_records(tmp_path / "data.csv")
    (tmp_path / "data.json").write_text(json.dumps({"id": "not a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_records(tmp_path / "data.json")


# ---------------------------------------------------------------- hostile lines
HOSTILE_LINES = {
    "deep_list": ("[" * 50_000 + "]" * 50_000, "not_json"),
    "deep_object": ('{"a":' * 50_000 + "1" + "}" * 50_000, "not_json"),
    "deep_conversations": ('{"id": "deep", "conversations": ' + "[" * 900 + "]" * 900 + "}",
                           "bad_turn"),
    "overlong_image_path": ({"id": "long", "image": "a" * 5000 + ".png",   # OSError from stat
                             "conversations": [turn("human", "q"), turn("gpt", "a")]}, "error"),
    "huge_id": ({"id": "x" * 100_000, "conversations": []}, "empty_conversation"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_one_hostile_line_is_a_counted_skip(image_dir, case):
    line, reason = HOSTILE_LINES[case]
    path = write_jsonl(image_dir / "data.jsonl", [good("first"), line, good("last")])
    with pytest.warns(UserWarning) as caught:
        records, report = load_records(path)
    assert [r.id for r in records] == ["first", "last"]
    assert (report.loaded, report.skipped, report.reasons) == (2, 1, {reason: 1})
    assert all(len(str(w.message)) < 400 for w in caught)       # a huge id is cut in the warning


def test_a_line_that_is_not_utf8_skips_only_that_line(image_dir):
    path = image_dir / "data.jsonl"
    path.write_bytes(json.dumps(good("first")).encode() + b"\n\xff\xfe{broken\n"
                     + json.dumps(good("last")).encode() + b"\n")
    with pytest.warns(UserWarning, match="line 2: not_utf8"):
        records, report = load_records(path)
    assert [r.id for r in records] == ["first", "last"] and report.reasons == {"not_utf8": 1}


def test_a_deeply_nested_json_file_is_a_value_error(tmp_path):
    (tmp_path / "data.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ValueError, match="data.json.*JSON list"):
        load_records(tmp_path / "data.json")


def test_images_above_the_pixel_limit_are_rejected_before_decoding(image_dir, monkeypatch):
    Image.new("L", (12000, 12000)).save(image_dir / "images" / "bomb.png", optimize=True)
    Image.new("RGB", (64, 64)).save(image_dir / "images" / "small.png")
    assert (image_dir / "images" / "bomb.png").stat().st_size < 1_000_000   # tiny file, 144 Mpx
    decoded = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load",
                        lambda self: decoded.append(self.size) or original_load(self))
    path = write_jsonl(image_dir / "data.jsonl", [good("bomb", "images/bomb.png"),
                                                  good("small", "images/small.png")])
    with pytest.warns(UserWarning, match="record 'bomb': image_too_large.*12000x12000"):
        records, report = load_records(path)
    assert [r.id for r in records] == ["small"] and report.reasons == {"image_too_large": 1}
    assert (12000, 12000) not in decoded
    _, report = load_records(path, max_image_pixels=32 * 32)      # configurable
    assert report.reasons == {"image_too_large": 2}
    _, report = load_records(path, max_image_pixels=None)         # no pixel limit: the side
    assert report.loaded == 1 and report.reasons == {"image_too_large": 1}   # limit still holds
    with pytest.raises(ValueError, match="max_image_pixels must be a positive int or None"):
        load_records(path, max_image_pixels=0)
