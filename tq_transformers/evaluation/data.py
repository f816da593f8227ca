"""Real text for evaluation: the shared data folder, local files and Hugging Face datasets, all read through
``datasets`` (the evaluation's data layer; no hub access is needed for local files).

The shared data folder sits beside the project's checkout (``<repo>/../shared/data``) and holds
WikiText-2 and two long documents, with their sha256 in ``SHA256SUMS``. It is read in place, never
copied into the project.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import torch

#: Short names of the shared files, relative to :func:`shared_data_dir`.
KNOWN_TEXTS: dict[str, str] = {
    "wikitext2-test": "wikitext-2/test.txt",
    "wikitext2-valid": "wikitext-2/valid.txt",
    "kjv": "long/kjv_bible.txt",
    "debian-handbook": "long/debian_handbook.txt",
}

#: Characters of text tokenized per requested token (generous: English runs ~4 chars a token).
CHARS_PER_TOKEN = 8

_verified: set[Path] = set()


def shared_data_dir() -> Path:
    """Locate the shared data folder.

    ``$TQ_DATA_DIR`` if set; else the first ``shared/data`` found beside an ancestor of this
    package or of the current directory (i.e. ``<repo>/../shared/data``).
    """
    env = os.environ.get("TQ_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"TQ_DATA_DIR={env!r} is not a directory")
        return path
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise FileNotFoundError(
        f"shared data folder not found: no shared/data in any ancestor of {starts[0]} or {starts[1]} "
        "(expected <repo>/../shared/data); set TQ_DATA_DIR to the folder holding wikitext-2/ and long/"
    )


def _expected_sha256(data_dir: Path, rel: str) -> str:
    sums = data_dir / "SHA256SUMS"
    if not sums.exists():
        raise FileNotFoundError(f"{sums} not found: cannot verify {rel}")
    for line in sums.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == rel:
            return fields[0].lower()
    raise ValueError(f"{rel} has no entry in {sums}")


def shared_file(name: str) -> Path:
    """Path of shared text ``name`` (a key of ``KNOWN_TEXTS``), sha256-checked once per process."""
    if name not in KNOWN_TEXTS:
        raise ValueError(f"name must be one of {sorted(KNOWN_TEXTS)}; got {name!r}")
    data_dir = shared_data_dir()
    rel = KNOWN_TEXTS[name]
    path = data_dir / rel
    if not path.exists():
        raise FileNotFoundError(f"shared text {name!r}: {path} not found")
    key = path.resolve()
    if key not in _verified:
        expected = _expected_sha256(data_dir, rel)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"shared text {name!r} ({path}): expected sha256 {expected}, got {digest}")
        _verified.add(key)
    return path


def _datasets():
    """The ``datasets`` module (the evaluation's data layer), or an ImportError naming the extra to install."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("the evaluation reads every text through the 'datasets' package: "
                          "pip install 'tq_transformers[eval]' (or pip install datasets)") from e
    return datasets


@contextmanager
def _quiet(datasets):
    """Silence ``datasets``' per-load progress bars (the evaluation shows its own) and restore them afterwards."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def text_dataset(path: str | os.PathLike):
    """A local UTF-8 text file as a one-row ``datasets.Dataset`` (column ``text``, the whole file unchanged).

    Loaded with the ``text`` builder (``data_files=path``, ``sample_by="document"``), so no hub access is needed.
    """
    datasets = _datasets()
    with _quiet(datasets):
        ds = datasets.load_dataset("text", data_files=os.fspath(path), split="train", sample_by="document")
    return ds if len(ds) else datasets.Dataset.from_dict({"text": [""]})  # an empty file has no document


def parse_hf_spec(spec: str) -> tuple[str, str | None, str, str]:
    """``hf:<name>[:<config>]:<split>[:<column>]`` as (name, config or None, split, column).

    Two fields are ``name:split``, three ``name:config:split``, four ``name:config:split:column`` (leave config
    empty, ``name::split:column``, to give a column without a config). The column defaults to ``text``. ``name`` is a
    hub id or a local folder that ``datasets.load_dataset`` reads (data files in it, e.g. ``train.jsonl``).
    """
    fields = spec[len("hf:"):].split(":")
    if len(fields) == 2:
        return fields[0], None, fields[1], "text"
    if len(fields) == 3:
        return fields[0], fields[1] or None, fields[2], "text"
    if len(fields) == 4:
        return fields[0], fields[1] or None, fields[2], fields[3]
    raise ValueError(f"spec must look like hf:<name>[:<config>]:<split>[:<column>]; got {spec!r}")


def _load_hf(spec: str) -> str:
    """Load ``hf:<name>[:<config>]:<split>[:<column>]`` with ``datasets``; rows joined by blank lines."""
    name, config, split, column = parse_hf_spec(spec)
    datasets = _datasets()
    with _quiet(datasets):
        ds = datasets.load_dataset(name, config, split=split)
    if column not in ds.column_names:
        raise ValueError(f"column must be one of {ds.column_names} for {spec!r}; got {column!r}")
    return "\n\n".join(ds[column])


def load_text(spec: str | os.PathLike) -> str:
    """Return the text named by ``spec``, read through ``datasets``.

    ``spec`` is a short name from ``KNOWN_TEXTS`` (shared data, sha256-checked, then loaded with the ``text``
    builder), a path to a local UTF-8 text file (the ``text`` builder), or ``hf:<name>[:<config>]:<split>[:<column>]``
    (``datasets.load_dataset``: a hub id, or a local dataset folder).
    """
    spec_str = os.fspath(spec)
    if spec_str in KNOWN_TEXTS:
        return text_dataset(shared_file(spec_str))[0]["text"]
    if spec_str.startswith("hf:"):
        return _load_hf(spec_str)
    path = Path(spec_str).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"spec must be one of {sorted(KNOWN_TEXTS)}, an existing text file, or "
            f"hf:<name>[:<config>]:<split>[:<column>]; got {spec_str!r} (no such file)"
        )
    return text_dataset(path)[0]["text"]


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None,
                  add_special_tokens: bool = False) -> torch.Tensor:
    """Tokenize ``text`` into a 1-D LongTensor of ids, at most ``max_tokens`` long.

    With ``max_tokens`` only a prefix of ``CHARS_PER_TOKEN * max_tokens`` characters is tokenized
    (doubled until it yields enough tokens or covers the text), so big files stay fast.
    """
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None; got {max_tokens!r}")
    n_chars = len(text) if max_tokens is None else CHARS_PER_TOKEN * max_tokens
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
        if max_tokens is None or len(ids) >= max_tokens or n_chars >= len(text):
            break
        n_chars *= 2
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)
