"""Batched RULER generation (tq_transformers.evaluation.ruler): left padding, batch sizing, per-row end of sequence,
and batched answers equal to unbatched ones (model-free units, then a tiny random Llama in float32)."""

from __future__ import annotations

import io

import pytest
import torch

from tq_transformers.evaluation import config as eval_config
from tq_transformers.evaluation import ruler
from tq_transformers.evaluation.runner import MethodSpec

from cases import build_tiny

# Prompt lengths of the padded batches: the shorter two are left-padded by 128 and 256 tokens, multiples of every
# flush and group size below (so a quantized row's window and groups line up as when it runs alone). The settings
# below keep no sink tokens and no centering mean (a mean of the first quantized tokens would include the padding).
ALIGNED_LENGTHS = (304, 176, 48)
# Lengths whose padding (7, 61 tokens) lines up with nothing.
RAGGED_LENGTHS = (200, 193, 139)
NEW_TOKENS = 24  # crosses a 32-token flush of the windows below

FULL = MethodSpec("full", "full")
QUANTIZED = [
    MethodSpec("kivi-2", "kivi", {"bits": 2, "group_size": 32, "residual_length": 32}),
    MethodSpec("turboquant-4-uncentered", "turboquant", {"bits": 4, "flush_size": 32, "center": False}),
    MethodSpec("bonsai-1-rotated", "bonsai", {"rotate": True, "group_size": 64, "residual_length": 64,
                                              "flush_size": 64}),
]


def prompts_of(lengths, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    m = build_tiny("llama")  # float32, seeded weights; pad id 0
    m.generation_config.eos_token_id = None  # every row runs its whole budget unless a test sets one
    return m


# ---------------------------------------------------------------- model-free units
def test_left_pad_and_padded_positions():
    ids, mask = ruler.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ruler.padded_positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("cap, length, rows", [(None, 32768, 10), (327680, 32768, 10), (163840, 32768, 5),
                                               (1000, 32768, 1), (163840, 4096, 10)],
                         ids=["no-cap", "cap-fits", "cap-halves", "cap-below-one", "short-length"])
def test_batch_rows_respects_max_batch_tokens(cap, length, rows):
    assert ruler.batch_rows({"batch_size": 10, "max_batch_tokens": cap}, length) == rows


@pytest.mark.parametrize("key, value, match", [
    ("batch_size", 0, "ruler.batch_size must be a positive integer, got 0"),
    ("max_batch_tokens", -1, "ruler.max_batch_tokens must be a positive integer or null, got -1"),
    ("side_by_side", "yes", "ruler.side_by_side must be true or false, got str"),
], ids=["batch_size", "max_batch_tokens", "side_by_side"])
def test_bad_batch_settings_name_the_key(key, value, match):
    bad = eval_config.merge(eval_config.DEFAULTS, {"ruler": {key: value}})
    with pytest.raises((ValueError, TypeError), match=match):
        eval_config.validate(bad)


def test_ruler_units_count_batches_and_settings():
    from tq_transformers.evaluation.runner import forward_units

    rcfg = eval_config.merge(eval_config.DEFAULTS["ruler"], {"lengths": [1024], "num_samples": 3, "batch_size": 2,
                                                            "prefill_chunk": 4096, "only": ["vt"]})
    steps = 30  # RULER's variable-tracking budget
    head = 1024 - steps - 1
    want = sum(forward_units(b, head) + steps * forward_units(4 * b, 1) for b in (2, 1))
    assert ruler.ruler_units(rcfg, 4) == want
    apart = ruler.ruler_units({**rcfg, "side_by_side": False}, 4)
    assert apart == sum(forward_units(b, head) + 4 * steps * forward_units(b, 1) for b in (2, 1))


# ---------------------------------------------------------------- tiny random Llama, float32
def alone(model, prompts, specs, **kw):
    """Each prompt in a batch of its own: per setting, per prompt, the generated ids."""
    rows = [ruler.generate_batch(model, [p], specs, NEW_TOKENS, 64, **kw) for p in prompts]
    return [[r[s][0] for r in rows] for s in range(len(specs))]


@pytest.mark.parametrize("lengths", [ALIGNED_LENGTHS, RAGGED_LENGTHS], ids=["aligned-padding", "ragged-padding"])
def test_full_precision_batched_equals_unbatched(model, lengths):
    prompts = prompts_of(lengths)
    batched = ruler.generate_batch(model, prompts, [FULL], NEW_TOKENS, 64)
    assert batched == alone(model, prompts, [FULL])
    assert all(len(row) == NEW_TOKENS for row in batched[0])
    plain = model.generate(torch.tensor([prompts[1]]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert batched[0][1] == plain[0, len(prompts[1]):].tolist()  # the padded row is ordinary greedy decoding


@pytest.mark.parametrize("side_by_side", [True, False], ids=["side-by-side", "one-generate-per-cache"])
def test_quantized_batched_equals_unbatched_when_padding_lines_up(model, side_by_side):
    prompts = prompts_of(ALIGNED_LENGTHS)
    specs = [FULL, *QUANTIZED]
    batched = ruler.generate_batch(model, prompts, specs, NEW_TOKENS, 64, side_by_side=side_by_side)
    assert batched == alone(model, prompts, specs)
    assert batched[1] != batched[0] or batched[3] != batched[0]  # the quantized history is what the answers read


def test_quantized_ragged_padding_keeps_rows_apart(model):
    """With padding that lines up with no window, a quantized row can differ from its unbatched run, but it is still
    a function of its own prompt and padding only: the same row padded the same way in another batch agrees."""
    prompts = prompts_of(RAGGED_LENGTHS)
    specs = [FULL, *QUANTIZED]
    batched = ruler.generate_batch(model, prompts, specs, NEW_TOKENS, 64)
    filler = prompts_of((200,), seed=9)  # another longest row: the others keep their padding
    other = ruler.generate_batch(model, [filler[0], prompts[1], prompts[2]], specs, NEW_TOKENS, 64)
    for s in range(len(specs)):
        assert other[s][1:] == batched[s][1:], specs[s].name
    assert batched[0] == alone(model, prompts, [FULL])[0]


def test_each_row_stops_at_its_end_of_sequence(model):
    prompts = prompts_of(ALIGNED_LENGTHS)
    free = ruler.generate_batch(model, prompts, [FULL], NEW_TOKENS, 64)[0]
    stop = free[0][5]  # row 0's sixth token becomes the end-of-sequence id
    cut = [row[:row.index(stop)] if stop in row else row for row in free]
    model.generation_config.eos_token_id = stop
    try:
        stopped = ruler.generate_batch(model, prompts, [FULL], NEW_TOKENS, 64)[0]
    finally:
        model.generation_config.eos_token_id = None
    assert stopped == cut and len(stopped[0]) <= 5


def test_run_task_bar_names_task_length_and_setting(model, monkeypatch):
    from tq_transformers.evaluation import progress
    from tq_transformers.evaluation.ruler_tasks import RulerTask, Sample

    stream = io.StringIO()
    real_bar = progress.bar
    bars = []

    def recording_bar(*args, **kwargs):
        bars.append(real_bar(*args, **{**kwargs, "stream": stream}))
        bars[-1].interval = 0.0
        return bars[-1]

    monkeypatch.setattr(progress, "bar", recording_bar)

    class Ids:  # a prompt format whose "text" is already token ids
        def __call__(self, text, prefix):
            return text

        def encode(self, prompt):
            return prompt

    class Decode:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    task = RulerTask("vt", "variable_tracking", {"num_chains": 1, "num_hops": 4})
    prompts = prompts_of((224, 192, 150))  # the first batch's padding (32) lines up with KIVI's groups
    samples = [Sample("vt", 256, i, p, "", ["x"], len(p)) for i, p in enumerate(prompts)]
    rcfg = {**eval_config.DEFAULTS["ruler"], "batch_size": 2, "side_by_side": False, "max_new_tokens": {
        "variable_tracking": 6}, "prefill_chunk": 64}
    specs = [FULL, QUANTIZED[0]]
    answers, padding = ruler.run_task(model, Decode(), Ids(), task, 256, samples, specs, rcfg)
    assert padding == [0, 32, 0]  # batches (224, 192) and (150,)
    log = stream.getvalue()
    assert "ruler vt @ 256: 3 samples x 2 settings" in log
    assert "batch 1/2 (2 x 224 tokens): kivi-2" in log and "batch 2/2 (1 x 150 tokens): full" in log
    assert bars[0].n == bars[0].total  # every prefill token and decode step counted
    direct = alone(model, prompts, specs)
    assert answers == [[" ".join(map(str, row[:6])) for row in rows] for rows in direct]


def test_fast_path_gives_the_reference_paths_answers(model):
    from tq_transformers.evaluation.runner import attn_implementation

    prompts = prompts_of(ALIGNED_LENGTHS)
    specs = [FULL, *QUANTIZED]
    reference = ruler.generate_batch(model, prompts, specs, NEW_TOKENS, 64, side_by_side=False)
    before = attn_implementation(model)
    with ruler.fast_decoding(model):
        assert attn_implementation(model) != before
        fast = ruler.generate_batch(model, prompts, specs, NEW_TOKENS, 64, side_by_side=False, fast=True)
    assert attn_implementation(model) == before
    assert fast == reference
    with pytest.raises(ValueError, match="side_by_side must be False with fast=True"):
        ruler.generate_batch(model, prompts, specs, NEW_TOKENS, 64, side_by_side=True, fast=True)
    bad = eval_config.merge(eval_config.DEFAULTS, {"ruler": {"fast": True}})
    with pytest.raises(ValueError, match="ruler.side_by_side must be false with ruler.fast: true"):
        eval_config.validate(bad)


@pytest.mark.parametrize("argv, want", [
    ([], {"batch_size": 4, "fast": False, "side_by_side": True}),
    (["--ruler-batch-size", "1"], {"batch_size": 1, "fast": False, "side_by_side": True}),
    (["--ruler-fast"], {"batch_size": 4, "fast": True, "side_by_side": False}),
], ids=["defaults", "batch-size", "fast"])
def test_cli_batch_flags(argv, want):
    from tq_transformers.evaluation import cli

    rcfg = cli.build_config(cli.parse_args(["--config", "default", "--device", "cpu", *argv]))["ruler"]
    assert {k: rcfg[k] for k in want} == want
