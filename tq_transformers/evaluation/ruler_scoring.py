"""RULER's scoring (Hsieh et al., 2024; NVIDIA/RULER ``scripts/eval/synthetic/constants.py``): the clean-up of a
generated answer and ``string_match_all``, the share of expected values contained (case-insensitively) in the output,
in percent; :mod:`.ruler_metric` serves it as an ``evaluate`` metric module loaded from this package (no hub).
"""

from __future__ import annotations

import re


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a generated answer: control characters become newlines, then strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's score: mean over samples of the share of a sample's references contained (case-insensitively) in its
    prediction, in percent (0-100)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"predictions and references must be non-empty and of one length, got {len(predictions)} and "
                         f"{len(references)}")
    total = 0.0
    for pred, refs in zip(predictions, references):
        if not refs:
            raise ValueError(f"references must hold at least one expected value per sample, got {refs!r}")
        pred = pred.lower()
        total += sum(r.lower() in pred for r in refs) / len(refs)
    return 100.0 * total / len(predictions)


def score(predictions: list[str], references: list[list[str]], use_evaluate: bool = True) -> float:
    """`string_match_all` of the post-processed predictions, through the ``evaluate`` metric module of this package
    (:mod:`.ruler_metric`, loaded from its file: no hub) when ``use_evaluate`` is set."""
    preds = [postprocess(p) for p in predictions]
    if not use_evaluate:
        return string_match_all(preds, references)
    return float(load_metric().compute(predictions=preds, references=references)["string_match_all"])


_METRIC = None


def load_metric():
    """The RULER string-match metric as an ``evaluate`` module (``evaluate.load`` on this package's script)."""
    global _METRIC
    if _METRIC is None:
        from pathlib import Path

        try:
            import evaluate
        except ImportError as e:
            raise ImportError("RULER scoring uses the 'evaluate' package: pip install 'tq_transformers[eval]'") from e
        _METRIC = evaluate.load(str(Path(__file__).with_name("ruler_metric.py")))
    return _METRIC
