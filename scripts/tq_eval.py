#!/usr/bin/env python
"""Thin wrapper of `tq-eval` (tq_transformers.evaluation.cli): python scripts/tq_eval.py --config default."""

import sys

from tq_transformers.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
