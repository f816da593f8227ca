"""Evaluation configuration: YAML files in configs/, merged over the embedded defaults (`DEFAULTS`).

`DEFAULTS` is the content of configs/default.yaml (a test keeps them equal), so `tq-eval` works without the repo.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .models import parse_dtype
from .ruler_tasks import KINDS, STANDARD_TASKS, tasks_from_config
from .runner import REFERENCE, MethodSpec
from .util import describe

#: configs/ of a source checkout (absent in a plain wheel install: then DEFAULTS is used).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

DEFAULTS: dict[str, Any] = {
    "name": "default",
    "model": "qwen2.5-coder-1.5b",
    "device": "cpu",
    "dtype": "fp32",
    "methods": [
        {"name": "full", "method": "full"},
        {"name": "turboquant-4", "method": "turboquant", "bits": 4},
        {"name": "kivi-2", "method": "kivi", "bits": 2, "group_size": 32, "residual_length": 128},
        {"name": "bonsai-1", "method": "bonsai", "group_size": 128, "residual_length": 128},
        {"name": "bonsai-1-improved", "method": "bonsai", "center": True, "rotate": True},
    ],
    "perplexity": {
        "enabled": True,
        "data": "wikitext2-test",
        "segments": 1,
        "context_length": 1024,
        "continuation_length": 256,
        "chunk_size": 16,
    },
    "needle": {
        "enabled": True,
        "haystack": "kjv",
        "lengths": [1024],
        "depths": [0.1, 0.5, 0.9],
        "needle": "The secret passcode is 7-4-1-9-3.",
        "answer": "7-4-1-9-3",
        "question": "What is the secret passcode stated in the text above?",
        "answer_prefix": "The secret passcode is",
        "max_new_tokens": 10,
    },
    "agreement": {
        "enabled": True,
        "data": "debian-handbook",
        "num_prompts": 2,
        "prompt_length": 512,
        "new_tokens": 24,
    },
    "ruler": {
        "enabled": False,
        "haystack": "debian-handbook",
        "words": "wikitext2-valid",
        "lengths": [2048, 4096],
        "num_samples": 2,
        "seed": 42,
        "template": "auto",
        "prefill_chunk": 1024,
        "batch_size": 4,
        "max_batch_tokens": None,
        "side_by_side": True,
        "fast": False,
        "use_evaluate": True,
        "max_new_tokens": {},
        "only": None,
        "tasks": copy.deepcopy(STANDARD_TASKS),
    },
    "projection": {"seq_len": 32768, "batch_size": 1},
    "quick": {
        "methods_limit": None,
        "perplexity": {"context_length": 256, "continuation_length": 32},
        "needle": {"lengths": [512], "depths": [0.5]},
        "agreement": {"num_prompts": 1, "prompt_length": 256, "new_tokens": 8},
        "ruler": {"lengths": [1024], "num_samples": 1},
    },
}

_SECTIONS = ("perplexity", "needle", "agreement", "ruler", "projection")


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge: values of `override` win; lists are replaced, not merged."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config_path(spec: str) -> Path | None:
    """A config file from a path, or a name in configs/ ("default", "kivi", ...). None for the embedded default."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{spec}.yaml"
    if candidate.is_file():
        return candidate
    if spec == "default":
        return None
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else ["default"]
    raise ValueError(f"config must be a YAML file or one of {names}, got {spec!r}")


def load_config(spec: str = "default") -> dict:
    """The configuration named by `spec`, merged over `DEFAULTS` (its name defaults to the file's stem)."""
    path = resolve_config_path(spec)
    if path is None:
        return copy.deepcopy(DEFAULTS)
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TypeError(f"config {path} must hold a mapping at the top level, got {describe(data)}")
    unknown = set(data) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"config keys must be among {sorted(DEFAULTS)}, got unknown {sorted(unknown)} in {path}")
    cfg = merge(DEFAULTS, data)
    cfg.setdefault("name", path.stem)
    if "name" not in data:
        cfg["name"] = path.stem
    return cfg


def apply_quick(cfg: dict) -> dict:
    """The config with its `quick` overrides applied (smaller lengths, fewer prompts)."""
    quick = dict(cfg.get("quick") or {})
    limit = quick.pop("methods_limit", None)
    out = merge(cfg, quick)
    if limit:
        out["methods"] = out["methods"][:limit]
    out["name"] = f"{cfg['name']}-quick"
    return out


def apply_max_length(cfg: dict, max_length: int) -> dict:
    """Cap every sequence at `max_length` tokens (needle lengths above it are dropped; at least one is kept)."""
    if not isinstance(max_length, int) or max_length < 64:
        raise ValueError(f"max_length must be an integer >= 64, got {max_length!r}")
    out = copy.deepcopy(cfg)
    ppl = out["perplexity"]
    total = ppl["context_length"] + ppl["continuation_length"]
    if total > max_length:
        ppl["continuation_length"] = min(ppl["continuation_length"], max_length // 4)
        ppl["context_length"] = max_length - ppl["continuation_length"]
    lengths = [n for n in out["needle"]["lengths"] if n <= max_length]
    out["needle"]["lengths"] = lengths or [max_length]
    out["agreement"]["prompt_length"] = min(out["agreement"]["prompt_length"], max_length)
    ruler_lengths = [n for n in out["ruler"]["lengths"] if n <= max_length]
    out["ruler"]["lengths"] = ruler_lengths or [max_length]
    return out


_POSITIVE_INTS = {
    "perplexity": ("segments", "context_length", "continuation_length", "chunk_size"),
    "needle": ("max_new_tokens",),
    "agreement": ("num_prompts", "prompt_length", "new_tokens"),
    "ruler": ("num_samples", "prefill_chunk", "batch_size"),
    "projection": ("seq_len", "batch_size"),
}


def validate(cfg: dict) -> dict:
    """Raise a ValueError naming the key, what is allowed and the value given, for any bad setting; returns `cfg`."""
    for key in ("name", "model", "device"):
        if not isinstance(cfg[key], str):
            raise TypeError(f"{key} must be a string, got {describe(cfg[key])}")
        if not cfg[key]:
            raise ValueError(f"{key} must be a non-empty string, got {cfg[key]!r}")
    parse_dtype(cfg["dtype"], "dtype")
    for section in (*_POSITIVE_INTS, "quick"):
        if not isinstance(cfg[section], dict):
            raise TypeError(f"{section} must be a mapping, got {describe(cfg[section])}")
    if not isinstance(cfg["methods"], list):
        raise TypeError(f"methods must be a list of settings, got {describe(cfg['methods'])}")
    if not cfg["methods"]:
        raise ValueError("methods must hold at least one setting, got an empty list")
    for section, keys in _POSITIVE_INTS.items():
        for key in keys:
            value = cfg[section][key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{section}.{key} must be a positive integer, got {value!r}")
    if cfg["perplexity"]["continuation_length"] < 2:
        raise ValueError(
            f"perplexity.continuation_length must be >= 2, got {cfg['perplexity']['continuation_length']!r}"
        )
    lengths = cfg["needle"]["lengths"]
    if not isinstance(lengths, list) or not lengths or not all(isinstance(n, int) and n > 0 for n in lengths):
        raise ValueError(f"needle.lengths must be a non-empty list of positive integers, got {lengths!r}")
    depths = cfg["needle"]["depths"]
    if (not isinstance(depths, list) or not depths
            or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in depths)):
        raise ValueError(f"needle.depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    validate_ruler(cfg["ruler"])
    return cfg


def validate_ruler(rcfg: dict) -> dict:
    """Check the ``ruler`` section (lengths, seed, template, budgets, tasks); raises ValueError naming the key."""
    lengths = rcfg["lengths"]
    if (not isinstance(lengths, list) or not lengths
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths)):
        raise ValueError(f"ruler.lengths must be a non-empty list of positive integers, got {lengths!r}")
    if isinstance(rcfg["seed"], bool) or not isinstance(rcfg["seed"], int) or rcfg["seed"] < 0:
        raise ValueError(f"ruler.seed must be a non-negative integer, got {rcfg['seed']!r}")
    cap = rcfg["max_batch_tokens"]
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"ruler.max_batch_tokens must be a positive integer or null, got {cap!r}")
    for key in ("side_by_side", "fast"):
        if not isinstance(rcfg[key], bool):
            raise TypeError(f"ruler.{key} must be true or false, got {describe(rcfg[key])}")
    if rcfg["fast"] and rcfg["side_by_side"]:
        raise ValueError("ruler.side_by_side must be false with ruler.fast: true (the fused attention reads one cache "
                         "a generate), got side_by_side: true")
    if not isinstance(rcfg["use_evaluate"], bool):
        raise TypeError(f"ruler.use_evaluate must be true or false, got {describe(rcfg['use_evaluate'])}")
    budgets = rcfg["max_new_tokens"] or {}
    if not isinstance(budgets, dict):
        raise TypeError(f"ruler.max_new_tokens must be a mapping of task kinds to token counts, got "
                        f"{describe(budgets)}")
    for kind, value in budgets.items():
        if kind not in KINDS:
            raise ValueError(f"ruler.max_new_tokens keys must be among {sorted(KINDS)}, got {kind!r}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"ruler.max_new_tokens.{kind} must be a positive integer or null, got {value!r}")
    if rcfg["template"] not in ("auto", "chat", "plain"):
        raise ValueError(f"ruler.template must be one of ('auto', 'chat', 'plain'), got {rcfg['template']!r}")
    tasks_from_config(rcfg)
    return rcfg


def method_specs(cfg: dict, only: list[str] | None = None) -> list[MethodSpec]:
    """The settings to run, reference first. `only` picks names from the config (a bare method name not in the
    config, e.g. "kivi", gives that method at its default settings)."""
    entries = []
    for entry in cfg["methods"]:
        if not isinstance(entry, dict):
            raise TypeError(f"methods entries must be mappings with a 'method' key, got {describe(entry)}")
        if "method" not in entry:
            raise ValueError(f"methods entries must have a 'method' key, got {describe(entry)}")
        entry = dict(entry)
        method = entry.pop("method")
        name = entry.pop("name", method)
        entries.append(MethodSpec(name, method, entry))
    if only:
        by_name = {e.name: e for e in entries}
        picked = []
        for name in only:
            if name in by_name:
                picked.append(by_name[name])
            else:
                try:
                    picked.append(MethodSpec(name, name))
                except ValueError:
                    raise ValueError(
                        f"methods must be names from the config {sorted(by_name)} or method names, got {name!r}"
                    ) from None
        entries = picked
    entries = [e for e in entries if e.method != REFERENCE]
    names = [e.name for e in entries]
    clash = sorted({n for n in names if names.count(n) > 1 or n == REFERENCE})
    if clash:
        raise ValueError(f"setting names must be unique and other than {REFERENCE!r} (the reference's), got {clash}")
    return [MethodSpec(REFERENCE, REFERENCE)] + entries
