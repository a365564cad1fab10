"""Image paths stay inside the image folder and refused paths are never opened; images too
long or too wide are refused from their header; --data as a file or a directory; held-out
splits; the one-line load report."""
import builtins
import json
import os
import warnings
from pathlib import Path

import pytest
from PIL import Image

from mlan_kernels.data.records import find_data_files, load_records, split_records


def record(record_id, image=None):
    item = {"id": record_id, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                               {"from": "gpt", "value": "A cat."}]}
    if image is not None:
        item["image"] = image
    return item


@pytest.fixture
def layout(tmp_path):
    """tmp/images/ok.png (the image folder), tmp/outside/secret.png, tmp/data/train.json."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images" / "ok.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "outside" / "secret.png")
    os.symlink(tmp_path / "outside" / "secret.png", tmp_path / "images" / "link.png")
    os.symlink(tmp_path / "outside", tmp_path / "images" / "linkdir")
    os.symlink(tmp_path / "images" / "ok.png", tmp_path / "images" / "sub" / "inside.png")
    return tmp_path


def opened_paths(monkeypatch):
    """Every path given to builtins.open or PIL.Image.open from now on."""
    opened = []
    real_open, real_image_open = builtins.open, Image.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_image_open(fp, *a, **k))
    return opened


def test_paths_leaving_the_image_folder_are_skipped_and_never_opened(layout, monkeypatch):
    records = [record("ok", "ok.png"), record("inside-link", "sub/inside.png"),
               record("dotdot", "../outside/secret.png"), record("deep", "sub/../../outside/secret.png"),
               record("symlink", "link.png"), record("symlink-dir", "linkdir/secret.png"),
               record("passwd", "/etc/passwd"), record("environ", "/proc/self/environ")]
    path = layout / "data" / "train.json"
    path.write_text(json.dumps(records))
    opened = opened_paths(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, report = load_records(path, image_root=layout / "images")
    assert [r.id for r in loaded] == ["ok", "inside-link"]
    assert loaded[1].image == str((layout / "images" / "ok.png").resolve())
    assert report.reasons == {"image_outside_folder": 4, "image_absolute": 2}
    assert not [p for p in opened if "secret" in p or p in ("/etc/passwd", "/proc/self/environ")]
    assert str(layout / "images" / "ok.png") in opened or str((layout / "images" / "ok.png").resolve()) in opened


def test_absolute_paths_only_with_the_explicit_flag(layout):
    path = layout / "data" / "train.jsonl"
    path.write_text(json.dumps(record("abs", str(layout / "outside" / "secret.png"))) + "\n")
    with pytest.warns(UserWarning, match="record 'abs': image_absolute"):
        assert load_records(path, image_root=layout / "images")[1].reasons == {"image_absolute": 1}
    loaded, report = load_records(path, image_root=layout / "images", allow_absolute_images=True)
    assert report.loaded == 1 and loaded[0].image == str((layout / "outside" / "secret.png").resolve())


def test_a_long_thin_png_is_refused_from_its_header(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    Image.new("L", (16_000_000, 1)).save(tmp_path / "images" / "thin.png", optimize=True)
    Image.new("L", (300, 20)).save(tmp_path / "images" / "wide.png")      # 15:1, accepted
    Image.new("L", (20, 700)).save(tmp_path / "images" / "tall.png")      # 35:1, refused
    assert (tmp_path / "images" / "thin.png").stat().st_size < 100_000
    decoded = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or original_load(self))
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record("thin", "images/thin.png"), record("wide", "images/wide.png"),
                                record("tall", "images/tall.png")]))
    with pytest.warns(UserWarning, match="record 'thin': image_too_large.*16000000x1: a side above 8192"):
        loaded, report = load_records(path, max_image_pixels=None)
    assert [r.id for r in loaded] == ["wide"] and report.reasons == {"image_too_large": 2}
    assert (16_000_000, 1) not in decoded


def test_data_may_be_a_file_or_a_directory(tmp_path):
    (tmp_path / "llava.json").write_text("[]")
    assert find_data_files(tmp_path / "llava.json") == (tmp_path / "llava.json", None)
    (tmp_path / "set").mkdir()
    with pytest.raises(FileNotFoundError, match="no train.json or train.jsonl"):
        find_data_files(tmp_path / "set")
    (tmp_path / "set" / "train.json").write_text("[]")
    assert find_data_files(tmp_path / "set") == (tmp_path / "set" / "train.json", None)
    (tmp_path / "set" / "eval.jsonl").write_text("")
    assert find_data_files(tmp_path / "set")[1] == tmp_path / "set" / "eval.jsonl"
    (tmp_path / "set" / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match="both train.json and train.jsonl"):
        find_data_files(tmp_path / "set")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="expected a .json or .jsonl file"):
        find_data_files(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        find_data_files(tmp_path / "missing")


def test_held_out_split_is_seeded_disjoint_and_in_file_order(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record(f"r{i}") for i in range(10)]))
    records, _ = load_records(path)
    train, held = split_records(records, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert sorted(r.id for r in train + held) == sorted(r.id for r in records)
    assert [r.id for r in held] == sorted((r.id for r in held), key=lambda i: int(i[1:]))
    assert [r.id for r in split_records(records, 0.2, seed=3)[1]] == [r.id for r in held]
    assert len(split_records(records, 0.01)[1]) == 1                    # at least one
    assert split_records(records, 0.0) == (records, [])
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            split_records(records, bad)


def test_the_load_report_is_one_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record("t"), record("i", "b.png"), record("m", "missing.png"),
                                record("x", "../x.png"), record("y", "../y.png")]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = load_records(path)
    assert report.describe("train.json") == ("train.json: 2 records (1 with images), 3 skipped "
                                             "(image_missing 1, image_outside_folder 2)")
    assert Path(path).exists()
