"""A record holding a JSON-escaped lone surrogate ("\\ud800": valid JSON, not valid Unicode; a
tokenizer refuses it mid-training) is skipped when the data is loaded, through the data API
and through mlan-train, like any other bad record."""
import json
import shutil

import pytest

from mlan_kernels.data.records import load_records

from test_train_mixed import data, train  # noqa: F401 (data is a fixture)

GOOD = {"id": "good", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}


def with_surrogate(where):
    record = json.loads(json.dumps(GOOD))
    if where == "id":
        record["id"] = "bad-\ud800"
    else:
        record["conversations"][1 if where == "answer" else 0]["value"] = "x \udc00 y"
    return json.dumps(record)            # ensure_ascii: the file holds the escape "\udc00"


@pytest.mark.parametrize("where", ["question", "answer", "id"])
def test_load_records_skips_a_lone_surrogate(tmp_path, where):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + with_surrogate(where) + "\n")
    assert "\\ud" in path.read_text()          # the escape, not a character
    with pytest.warns(UserWarning, match="not_utf8: " + ("\"id\" holds a lone surrogate" if where == "id"
                                                         else "turn [01] holds a lone surrogate")):
        records, report = load_records(path)
    assert [record.id for record in records] == ["good"]
    assert report.skipped == 1 and report.reasons == {"not_utf8": 1}
    assert all(text.encode("utf-8") for record in records for _, text in record.turns)


def test_mlan_train_skips_it_and_trains(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    with open(copy / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write(with_surrogate("answer") + "\n")
    run = train(str(copy), tmp_path / "out", "--steps", "2", "--no-plots")
    files = run["data"]["files"]["train.jsonl"]
    assert files["skipped"] == 1 and files["reasons"] == {"not_utf8": 1}
