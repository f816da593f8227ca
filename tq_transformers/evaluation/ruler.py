"""Running the RULER-style suite (tasks: :mod:`.ruler_tasks`, scoring: :mod:`.ruler_scoring`): greedy `generate` on
the real model through a fresh cache of every setting, in left-padded batches of samples.

For one (task, length) the samples are cut into batches of `batch_rows` prompts (``ruler.batch_size``, bounded by
``ruler.max_batch_tokens``), longest first. A batch is left-padded to its longest prompt; its first T - 1 tokens are
prefilled once in full precision (chunks of ``ruler.prefill_chunk``, the attention mask and the padded positions
passed as `generate` would) and replayed into a fresh cache of every setting; then `model.generate` feeds the last
prompt token and every generated token through each cache (one batched generate for all caches, one block of rows
per cache, with ``ruler.side_by_side``; else one generate per cache), stopping each row at the end-of-sequence token.

Padding and the quantized caches: the pad tokens are masked out of attention, so the full-precision reference gives
the same answers batched or alone (tested). A quantized cache also stores the pad tokens of its rows: they move the
window boundary and KIVI's key groups by the padding, enter the centering mean of the first quantized tokens
(TurboQuant's default, Bonsai improved), and take the places of sink tokens (``sink_tokens``: a padded row's sinks
are pads). A row's answer equals its unbatched one exactly when its padding is a multiple of every flush and group
size, with neither centering nor sinks (tested); otherwise it may differ, as in any padded serving batch. Samples are
batched longest first and the suite records each sample's padding (``padding`` in the suite's samples), so its share
can be judged; ``batch_size: 1`` runs without padding.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .ruler_scoring import score
from .ruler_tasks import PromptFormat, RulerTask, Sample, Sources, generation_budget, make_samples, tasks_from_config


def suite_samples(tokenizer, rcfg: dict) -> tuple[list[RulerTask], dict[int, list[Sample]], PromptFormat]:
    """Every sample of the suite (tasks x lengths x num_samples), per length, and the prompt format."""
    from .data import load_text

    tasks = tasks_from_config(rcfg)
    sources = Sources(load_text(rcfg["haystack"]), load_text(rcfg["words"]))
    fmt = PromptFormat(tokenizer, rcfg["template"])
    samples = {
        length: [s for task in tasks for s in make_samples(task, sources, fmt, length, rcfg["num_samples"],
                                                           rcfg["seed"], generation_budget(task, rcfg))]
        for length in rcfg["lengths"]
    }
    return tasks, samples, fmt


def batch_rows(rcfg: dict, length: int) -> int:
    """Prompts of one batch at `length` tokens: ``batch_size``, lowered so that rows x length stays within
    ``max_batch_tokens`` (null: no bound); at least 1."""
    rows = rcfg["batch_size"]
    if rcfg.get("max_batch_tokens"):
        rows = min(rows, max(1, rcfg["max_batch_tokens"] // length))
    return rows


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded batch: (ids [B, T], attention mask [B, T], 0 on padding), T the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of a left-padded batch, as `generate` derives them from the mask: each row's real tokens
    count 0, 1, ...; padding gets 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill_padded(model, ids: torch.Tensor, mask: torch.Tensor, cache, chunk: int, on_prefill=None) -> None:
    """Feed `ids` [B, T] (left-padded, `mask` [B, T]) through `cache` in chunks of `chunk` tokens, with the attention
    mask and position ids `generate` would use; `on_prefill(k)` after each chunk of k tokens."""
    from .runner import forward

    positions = padded_positions(mask)
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        forward(model, ids[:, start:end], cache, last_only=True, attention_mask=mask[:, :end],
                position_ids=positions[:, start:end])
        if on_prefill is not None:
            on_prefill(end - start)


class _TokenCounter:
    """A `generate` streamer that counts decode steps (the first `put` is the prompt) for the progress bar."""

    def __init__(self, on_token):
        self.on_token, self.seen_prompt = on_token, False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.on_token()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def _eos_and_pad(model) -> tuple[Any, int]:
    """The generation config's end-of-sequence id(s) and the pad id (the first end-of-sequence id when unset)."""
    gen = model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return eos, (0 if pad is None else pad)


def _cut_at_eos(rows: list[list[int]], eos) -> list[list[int]]:
    stops = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def generate_batch(model, prompts: list[list[int]], specs, max_new_tokens: int, prefill_chunk: int,
                   side_by_side: bool = True, on_prefill=None, on_step=None, on_generate=None, fast: bool = False):
    """Greedy `generate` of a batch of prompts (token id lists, of any lengths) through a fresh cache of every
    setting.

    The prompts are left-padded to the longest (T tokens); the first T - 1 are prefilled once in full precision and
    replayed into a fresh cache of each setting (the state a prefill through that cache leaves; see
    `runner.build_caches`), then `model.generate` feeds the last prompt token and every generated token through each
    cache, so the whole answer reads each method's (partly quantized) history. With `side_by_side` one generate runs
    every cache (one block of B rows each); else one generate per cache. Each row stops at the end-of-sequence token.
    With `fast` (one generate per cache; the model must be switched to the fused attention, `fast_attention.install`,
    as `fast_decoding` does) every quantized cache decodes on its fast path (`fast_attention.prepare_cache`: the
    Triton kernels on CUDA, `cpu_attention` on the CPU), which attends to the same packed tokens as the reference path.

    Args:
        model: a causal LM (its generation config gives the end-of-sequence and pad ids).
        prompts: B token id lists.
        specs: the settings (`runner.MethodSpec`), n of them.
        max_new_tokens: the generation budget.
        prefill_chunk: prompt tokens per prefill forward.
        side_by_side: all caches in one generate (True) or one generate per cache.
        on_prefill: called with k after each prefill chunk of k tokens (progress).
        on_step: called after each decode step of a generate (progress).
        on_generate: called with the list of settings before each generate, and with None after it (progress).
        fast: decode quantized caches on their fast path (needs ``side_by_side=False``).

    Returns:
        Per setting (n lists), per prompt (B lists): the generated token ids, cut before the end-of-sequence token.
    """
    from transformers import DynamicCache

    from ..cache import QuantizedKVCache
    from ..fast_attention import prepare_cache
    from ..generation import CACHE_KWARG
    from .runner import RowSplitCache, can_replay, replay_prefill

    if fast and side_by_side:
        raise ValueError("side_by_side must be False with fast=True (the fused attention reads one cache a generate), "
                         "got side_by_side=True")
    on_generate = on_generate or (lambda group: None)
    eos, pad = _eos_and_pad(model)
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(model.device), mask.to(model.device)
    b, config = ids.shape[0], model.config
    head, head_mask = ids[:, :-1], mask[:, :-1]
    prefill = DynamicCache(config=config)
    prefill_padded(model, head, head_mask, prefill, prefill_chunk, on_prefill)
    replay = can_replay(prefill)
    if not replay:  # sliding-window layers: a real prefill through every cache, below
        del prefill
    groups = [list(specs)] if side_by_side else [[s] for s in specs]
    out = []
    for group in groups:
        n = len(group)
        caches = [spec.make(config) for spec in group]
        if fast:
            for c in caches:
                if isinstance(c, QuantizedKVCache):
                    prepare_cache(c, cuda_graphs=True)  # graphs where the model has the runner (fast_decoding)
        cache = caches[0] if n == 1 else RowSplitCache(caches, [b] * n)
        if replay:
            for c in caches:
                replay_prefill(prefill, c)
        else:
            prefill_padded(model, head.repeat(n, 1), head_mask.repeat(n, 1), cache, prefill_chunk)
        on_generate(group)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1), max_new_tokens=max_new_tokens,
                min_new_tokens=0, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                eos_token_id=eos, pad_token_id=pad, streamer=_TokenCounter(on_step) if on_step else None,
                **{CACHE_KWARG: cache},
            )
        on_generate(None)
        rows = _cut_at_eos(gen[:, ids.shape[1]:].cpu().tolist(), eos)
        out.extend(rows[i * b:(i + 1) * b] for i in range(n))
        del cache, caches
    return out


@contextlib.contextmanager
def fast_decoding(model, enabled: bool = True):
    """Inside, `model` attends through the fused attention of `fast_attention` (``install``; prefill and the
    full-precision cache go through SDPA as before) and, on CUDA, replays its decode steps from CUDA graphs
    (``cuda_graphs.install``: eager decoding of a small model is bound by the host); both are undone afterwards. A
    no-op when not `enabled`."""
    if not enabled:
        yield model
        return
    from .. import cuda_graphs, fast_attention

    previous = fast_attention.install(model)
    graphs = model.device.type == "cuda" and cuda_graphs.runner_of(model) is None  # ours to undo
    if graphs:
        cuda_graphs.install(model)
    try:
        yield model
    finally:
        if graphs:
            cuda_graphs.uninstall(model)
        fast_attention.uninstall(model, previous)


def generate_side_by_side(model, prompt: torch.Tensor, specs, max_new_tokens: int, prefill_chunk: int,
                          on_prefill=None, on_step=None):
    """Greedy `generate` of one `prompt` [1, T] through a fresh cache of every setting, side by side: `generate_batch`
    of a batch of one. Returns the generated token ids of each setting (lists, cut at the end-of-sequence token)."""
    per_spec = generate_batch(model, [prompt[0].tolist()], specs, max_new_tokens, prefill_chunk, True, on_prefill,
                              on_step)
    return [rows[0] for rows in per_spec]


# ----------------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------------
def _batches(n_samples: int, rows: int) -> list[int]:
    """Sizes of the batches of `n_samples` prompts at most `rows` a batch."""
    return [min(rows, n_samples - i) for i in range(0, n_samples, rows)]


def ruler_units(rcfg: dict, n_specs: int) -> int:
    """Work of the suite in the units of `progress.Overall` (prefill chunks, then decode steps of every setting), as
    `run_ruler` advances it (prompts taken at their budget, answers at their full budget)."""
    from .runner import forward_units

    tasks = tasks_from_config(rcfg)
    total = 0
    for length in rcfg["lengths"]:
        for task in tasks:
            steps = generation_budget(task, rcfg)
            head = length - steps - 1
            for b in _batches(rcfg["num_samples"], batch_rows(rcfg, length)):
                chunks = [min(rcfg["prefill_chunk"], head - s) for s in range(0, head, rcfg["prefill_chunk"])]
                total += sum(forward_units(b, c) for c in chunks)
                total += steps * (forward_units(n_specs * b, 1) if rcfg["side_by_side"]
                                  else n_specs * forward_units(b, 1))
    return total


class _Progress:
    """One (task, length)'s bar (unit: a prefill token of the batch or a decode step) and the overall estimate."""

    def __init__(self, progress, overall, rows: int):
        self.progress, self.overall, self.rows = progress, overall, rows
        self.step_rows, self.done, self.expected = rows, 0, 0

    def prefill(self, k: int) -> None:
        self._advance(k, self.rows, k)

    def step(self) -> None:
        self._advance(1, self.step_rows, 1)

    def start_generate(self, rows: int, budget: int) -> None:
        self.step_rows, self.done, self.expected = rows, 0, budget

    def end_generate(self) -> None:
        """Generation stopped (at its budget or early, at the end of the sequences): the steps not taken count as
        done, in the bar and in the overall estimate (which planned every answer at its full budget)."""
        from .runner import forward_units

        skipped = self.expected - self.done
        self.progress.update(skipped)
        if self.overall is not None and skipped > 0:
            self.overall.advance(skipped * forward_units(self.step_rows, 1))

    def _advance(self, steps: int, rows: int, tokens: int) -> None:
        from .runner import forward_units

        self.done += steps
        self.progress.update(steps)
        if self.overall is not None:
            self.overall.advance(forward_units(rows, tokens))


#: Key of `run_ruler`'s result that holds what was asked (prompt lengths, expected values), not a setting's scores.
SUITE_KEY = "_suite"


def _settings_label(group) -> str:
    return group[0].name if len(group) == 1 else f"{len(group)} caches side by side"


def run_task(model, tokenizer, fmt: PromptFormat, task: RulerTask, length: int, samples: list[Sample], specs,
             rcfg: dict, overall=None) -> tuple[list[list[str]], list[int]]:
    """Answers of every setting to `samples` (one task at one length), in batches, under a progress bar naming the
    task, length and setting.

    Args:
        model, tokenizer: the model and its tokenizer (answers are decoded without special tokens).
        fmt: the prompt format (`ruler_tasks.PromptFormat`).
        task, length, samples: the task, its length in tokens and its samples.
        specs: the settings (`runner.MethodSpec`).
        rcfg: the ``ruler`` config section (``batch_size``, ``max_batch_tokens``, ``side_by_side``, budgets).
        overall: the run's `progress.Overall` estimate, or None.

    Returns:
        (per setting in `specs` order, per sample in `samples` order: the decoded answer; per sample: its left
        padding in tokens).
    """
    from .progress import bar

    budget = generation_budget(task, rcfg)
    order = sorted(range(len(samples)), key=lambda i: -samples[i].prompt_tokens)  # longest first: less padding
    sizes = _batches(len(samples), batch_rows(rcfg, length))
    n, side = len(specs), rcfg["side_by_side"]
    generates = 1 if side else n
    answers: list[list[str | None]] = [[None] * len(samples) for _ in specs]
    padding = [0] * len(samples)
    total = 0
    for k, b in enumerate(sizes):
        first = sum(sizes[:k])
        width = max(samples[i].prompt_tokens for i in order[first:first + b])
        total += width - 1 + generates * budget
    desc = f"ruler {task.name} @ {length}: {len(samples)} samples x {n} settings"
    with bar(desc=desc, unit="step", total=total, overall=overall) as progress:
        start = 0
        for k, b in enumerate(sizes):
            picked = order[start:start + b]
            start += b
            prompts = [fmt.encode(fmt(samples[i].text, samples[i].answer_prefix)) for i in picked]
            counter = _Progress(progress, overall, b)
            batch_label = f"batch {k + 1}/{len(sizes)} ({b} x {max(map(len, prompts))} tokens)"

            def on_generate(group, counter=counter, batch_label=batch_label, b=b):
                if group is None:
                    counter.end_generate()
                else:
                    counter.start_generate(b * len(group), budget)
                    progress.set_postfix_str(f"{batch_label}: {_settings_label(group)}")

            progress.set_postfix_str(f"{batch_label}: prefill (full precision)")
            tokens = generate_batch(model, prompts, specs, budget, rcfg["prefill_chunk"], side, counter.prefill,
                                    counter.step, on_generate, fast=rcfg["fast"])
            width = max(map(len, prompts))
            for i, p in zip(picked, prompts):
                padding[i] = width - len(p)
            for s, rows in enumerate(tokens):
                for i, row in zip(picked, rows):
                    answers[s][i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers, padding


def run_ruler(model, tokenizer, specs, rcfg: dict, overall=None, on_task=None) -> dict[str, Any]:
    """Score every setting on the suite: per task and length, RULER's string-match (percent), the mean over tasks per
    length, and the answers; under `SUITE_KEY`, what was asked (prompt lengths, expected values).

    Args:
        on_task: called with the partial result (the same dict, scores so far) after every (task, length), e.g. to
            write it to disk, so that a run cut short keeps what it scored.
    """
    tasks, samples, fmt = suite_samples(tokenizer, rcfg)
    out = {s.name: {"scores": {t.name: {} for t in tasks}, "average": {}, "answers": {}} for s in specs}
    suite = {"template": "chat" if fmt.chat else "plain", "num_samples": rcfg["num_samples"],
             "lengths": list(rcfg["lengths"]), "batch_size": rcfg["batch_size"],
             "side_by_side": rcfg["side_by_side"], "fast": rcfg["fast"],
             "tasks": {t.name: {"kind": t.kind, **t.args} for t in tasks}, "samples": {}}
    with fast_decoding(model, rcfg["fast"]):
        _run_lengths(model, tokenizer, fmt, tasks, samples, specs, rcfg, overall, out, suite,
                     on_task or (lambda partial: None))
    out[SUITE_KEY] = suite
    return out


def _run_lengths(model, tokenizer, fmt, tasks, samples, specs, rcfg, overall, out, suite, on_task) -> None:
    """`run_ruler`'s loop over lengths and tasks: fills `out` (scores, averages, answers) and `suite["samples"]`."""
    for length, group in samples.items():
        for task in tasks:
            items = [s for s in group if s.task == task.name]
            answers, padding = run_task(model, tokenizer, fmt, task, length, items, specs, rcfg, overall)
            key = f"{task.name}@{length}"
            refs = [s.references for s in items]
            suite["samples"][key] = [{"prompt_tokens": s.prompt_tokens, "padding": pad, "references": s.references}
                                     for s, pad in zip(items, padding)]
            for spec, preds in zip(specs, answers):
                out[spec.name]["scores"][task.name][str(length)] = score(preds, refs, rcfg["use_evaluate"])
                out[spec.name]["answers"][key] = preds
            on_task({**out, SUITE_KEY: suite})
        for res in out.values():
            values = [res["scores"][t.name][str(length)] for t in tasks]
            res["average"][str(length)] = sum(values) / len(values)
