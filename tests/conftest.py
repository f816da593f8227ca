"""Shared fixtures: tiny random models of the architectures we support, built on the CPU in milliseconds.

The shared table and helpers are in ``cases`` (``build_tiny`` is re-exported here for the modules that import it
from conftest)."""

from __future__ import annotations

import copy

import pytest
import torch

from cases import build_tiny

__all__ = ["build_tiny"]

_PRISTINE: dict = {}  # (arch, dtype) -> a model no test ever receives: each gets a deep copy


@pytest.fixture
def tiny_model():
    """``tiny_model(arch="llama", dtype=torch.float32)``: a fresh tiny model on the CPU, in eval mode.

    Each call returns a deep copy of a model built once, so nothing a test does to its model (``.to("cuda")``, as a
    pipeline does by default on a GPU machine; ``enable``; hooks; training mode) reaches another test."""

    def get(arch="llama", dtype=torch.float32):
        key = (arch, dtype)
        if key not in _PRISTINE:
            _PRISTINE[key] = build_tiny(arch, dtype)
        model = copy.deepcopy(_PRISTINE[key])
        assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
        return model

    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
