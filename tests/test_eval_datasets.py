"""`datasets` as the evaluation's data layer: shared files, local files and hub-style specs (tested through a local
dataset folder, since the hub is unreachable here)."""

import json

import pytest

from tq_transformers.evaluation import data
from tq_transformers.evaluation.data import load_text, parse_hf_spec, text_dataset


def test_shared_text_goes_through_datasets(monkeypatch):
    calls = []
    real = data.text_dataset

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(data, "text_dataset", spy)
    text = load_text("wikitext2-valid")
    assert len(calls) == 1 and str(calls[0]).endswith("wikitext-2/valid.txt")
    assert text == calls[0].read_text(encoding="utf-8")  # the whole file, unchanged


def test_text_dataset_keeps_the_file_exactly(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("line one\n\n  line two\ttab\n", encoding="utf-8")
    ds = text_dataset(path)
    assert ds.column_names == ["text"] and ds.num_rows == 1
    assert ds[0]["text"] == "line one\n\n  line two\ttab\n"
    (tmp_path / "e.txt").write_text("")
    assert load_text(tmp_path / "e.txt") == ""


def test_hf_spec_through_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"text": "first row", "body": "alpha"}, {"text": "second row", "body": "beta"}]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "test.jsonl").write_text(json.dumps({"text": "held out", "body": "gamma"}) + "\n")
    assert load_text(f"hf:{folder}:train") == "first row\n\nsecond row"
    assert load_text(f"hf:{folder}:test") == "held out"
    assert load_text(f"hf:{folder}::train:body") == "alpha\n\nbeta"
    with pytest.raises(ValueError, match=r"column must be one of \['text', 'body'\].*got 'nope'"):
        load_text(f"hf:{folder}::train:nope")


def test_parse_hf_spec():
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test", "text")
    assert parse_hf_spec("hf:name:train") == ("name", None, "train", "text")
    assert parse_hf_spec("hf:name::train:body") == ("name", None, "train", "body")
    with pytest.raises(ValueError, match="hf:<name>"):
        parse_hf_spec("hf:a:b:c:d:e")
