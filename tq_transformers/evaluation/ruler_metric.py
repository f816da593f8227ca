"""RULER's string-match score as an ``evaluate`` metric module, loaded from this file (no hub)::

    import evaluate
    metric = evaluate.load("<path to>/tq_transformers/evaluation/ruler_metric.py")
    metric.compute(predictions=["... 1234567 ..."], references=[["1234567"]])  # {"string_match_all": 100.0}

The score itself is `tq_transformers.evaluation.ruler_scoring.string_match_all` (one home for the math); this module
gives it ``evaluate``'s interface (typed inputs, batching with ``add_batch``, the metric card below).
"""

import datasets
import evaluate

from tq_transformers.evaluation.ruler_scoring import string_match_all

_DESCRIPTION = """RULER's string_match_all (Hsieh et al., 2024): for each sample, the share of its expected values that
occur (case-insensitively) in the prediction; the mean over samples, in percent."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers (str).
    references: list of lists of expected values (str), one list per prediction.
Returns:
    string_match_all: mean share of expected values found, 0-100.
"""

_CITATION = """@article{hsieh2024ruler, title={RULER: What's the Real Context Size of Your Long-Context Language
Models?}, author={Hsieh, Cheng-Ping and others}, journal={arXiv preprint arXiv:2404.06654}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RulerMetric(evaluate.Metric):
    """RULER string_match_all."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references):
        return {"string_match_all": string_match_all(list(predictions), [list(r) for r in references])}
