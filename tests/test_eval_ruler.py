"""The RULER-style suite: task generation and scoring model-free (a character-count tokenizer), then end to end through
`tq-eval` on a tiny random Llama."""

import json
import re
from collections import Counter

import pytest
import torch
import yaml
from test_eval_quick import tiny_model_dir  # noqa: F401  (the tiny random Llama folder fixture)

from tq_transformers.evaluation import cli, ruler, ruler_scoring, ruler_tasks
from tq_transformers.evaluation import config as eval_config
from tq_transformers.evaluation.data import load_text
from tq_transformers.evaluation.runner import MethodSpec


class CharTokenizer:
    """A stand-in tokenizer: one token per 4 characters (no chat template)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range((len(text) + 3) // 4))}


@pytest.fixture(scope="module")
def sources():
    rcfg = eval_config.DEFAULTS["ruler"]
    return ruler_tasks.Sources(load_text(rcfg["haystack"]), load_text(rcfg["words"]))


def tasks():
    return {t.name: t for t in ruler_tasks.tasks_from_config(eval_config.DEFAULTS["ruler"])}


# ---------------------------------------------------------------- scoring
def test_string_match_all_is_rulers_score():
    assert ruler_scoring.string_match_all(["the values are 12 and 34"], [["12", "34"]]) == 100.0
    score = ruler_scoring.string_match_all(["only 12", "ABC-def here"], [["12", "34"], ["abc-DEF"]])
    assert score == 75.0  # (1/2 + 1) / 2
    assert ruler_scoring.string_match_all(["nothing"], [["x"]]) == 0.0
    with pytest.raises(ValueError, match="predictions and references must be non-empty and of one length"):
        ruler_scoring.string_match_all(["a"], [])
    with pytest.raises(ValueError, match="references must hold at least one"):
        ruler_scoring.string_match_all(["a"], [[]])
    assert ruler_scoring.postprocess("  1234\x00567\n ") == "1234\n567"


def test_evaluate_metric_module_gives_the_same_score():
    pytest.importorskip("evaluate")
    preds, refs = ["a 1234567 b", "UUID ab-cd", "none"], [["1234567", "7654321"], ["ab-cd"], ["q"]]
    direct = ruler_scoring.score(preds, refs, use_evaluate=False)
    assert direct == pytest.approx(50.0)
    assert ruler_scoring.score(preds, refs, use_evaluate=True) == pytest.approx(direct)


# ---------------------------------------------------------------- generation
def test_standard_tasks_follow_ruler(sources):
    t = tasks()
    assert set(t) >= {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                      "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"}
    assert t["vt"].args == {"num_chains": 1, "num_hops": 4}
    assert t["niah_multikey_1"].args["num_needle_k"] == 4 and t["cwe"].tokens_to_generate == 120


@pytest.mark.parametrize("length", [1024, 4096])
def test_every_sample_fits_its_budget_and_holds_its_answers(sources, length):
    fmt = ruler_tasks.PromptFormat(CharTokenizer(), "auto")
    assert not fmt.chat
    for task in tasks().values():
        budget = ruler_tasks.generation_budget(task, eval_config.DEFAULTS["ruler"])
        samples = ruler_tasks.make_samples(task, sources, fmt, length, 2, 42, budget)
        for s in samples:
            assert s.prompt_tokens <= length - budget
            assert s.prompt_tokens > 0.8 * (length - budget), (task.name, s.prompt_tokens)  # the haystack fills it
            assert s.references and all(r for r in s.references)
            if task.kind == "niah":
                for value in s.references:
                    assert f"is: {value}." in s.text
            elif task.kind == "variable_tracking":
                chain = s.text.rsplit("Memorize and track", 1)[1]  # after the solved example
                value = re.search(r"assigned the value (\d+) in the text above", chain).group(1)
                assert f"VAR {s.references[0]} = {value}" in chain
                for a, b in zip(s.references, s.references[1:]):
                    assert f"VAR {b} = VAR {a}" in chain
            elif task.kind == "common_words_extraction":
                listed = s.text.rsplit("Below is a numbered list of words.", 1)[1]
                counts = Counter(re.findall(r"\d+\. ([a-z]+)", listed.split("Question:")[0]))
                top = {w for w, _ in counts.most_common(len(s.references))}
                assert top == set(s.references)
            else:
                counts = Counter(s.text.split("Find the three most frequently appeared coded words.")[1]
                                 .split("\nQuestion")[0].split())
                ranked = [w for w, _ in counts.most_common() if w != "..."]
                assert ranked[:3] == s.references and counts["..."] > counts[ranked[0]]
        assert samples[0].text != samples[1].text  # samples differ


def test_samples_are_deterministic_from_the_seed(sources):
    fmt = ruler_tasks.PromptFormat(CharTokenizer(), "plain")
    task = tasks()["niah_multivalue"]
    a = ruler_tasks.make_samples(task, sources, fmt, 2048, 2, 7, 128)
    b = ruler_tasks.make_samples(task, sources, fmt, 2048, 2, 7, 128)
    c = ruler_tasks.make_samples(task, sources, fmt, 2048, 2, 8, 128)
    assert [s.text for s in a] == [s.text for s in b] and a[0].references == b[0].references
    assert a[0].references != c[0].references


def test_single_needle_wording_is_singular(sources):
    fmt = ruler_tasks.PromptFormat(CharTokenizer(), "plain")
    single = ruler_tasks.make_samples(tasks()["niah_single_3"], sources, fmt, 1024, 1, 42, 128)[0]
    assert single.text.startswith("A special magic uuid is hidden within the following text.")
    assert single.answer_prefix.startswith(" The special magic uuid for ") and single.answer_prefix.endswith(" is")
    multi = ruler_tasks.make_samples(tasks()["niah_multiquery"], sources, fmt, 1024, 1, 42, 128)[0]
    assert multi.text.startswith("Some special magic numbers are hidden") and ", and " in multi.answer_prefix
    assert len(multi.references) == 4


def test_words_are_whole_lowercase_words(sources):
    assert "dmiral" not in sources.words  # not the tail of "Admiral"
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 10 for w in sources.words)


def test_bad_task_settings_name_the_key():
    rcfg = eval_config.DEFAULTS["ruler"]
    with pytest.raises(ValueError, match="ruler.tasks.x.kind must be one of"):
        ruler_tasks.tasks_from_config({**rcfg, "tasks": {"x": {"kind": "qa"}}})
    with pytest.raises(ValueError, match=r"ruler.tasks.x arguments must be among .* got \['num_hops'\]"):
        ruler_tasks.tasks_from_config({**rcfg, "tasks": {"x": {"kind": "niah", "num_hops": 2}}})
    with pytest.raises(ValueError, match="ruler.tasks.x.type_needle_v must be one of"):
        ruler_tasks.tasks_from_config({**rcfg, "tasks": {"x": {"kind": "niah", "type_needle_v": "colours"}}})
    with pytest.raises(ValueError, match="ruler.only must name tasks"):
        ruler_tasks.tasks_from_config({**rcfg, "only": ["nope"]})
    with pytest.raises(ValueError, match="ruler.template must be one of"):
        ruler_tasks.PromptFormat(CharTokenizer(), "jinja")
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        ruler_tasks.PromptFormat(CharTokenizer(), "chat")
    bad = eval_config.merge(eval_config.DEFAULTS, {"ruler": {"max_new_tokens": {"niah": 0}}})
    with pytest.raises(ValueError, match="ruler.max_new_tokens.niah must be a positive integer or null, got 0"):
        eval_config.validate(bad)
    bad = eval_config.merge(eval_config.DEFAULTS, {"ruler": {"lengths": []}})
    with pytest.raises(ValueError, match="ruler.lengths must be a non-empty list"):
        eval_config.validate(bad)


def test_too_short_length_is_a_clear_error(sources):
    fmt = ruler_tasks.PromptFormat(CharTokenizer(), "plain")
    with pytest.raises(ValueError, match="ruler lengths must leave room for the vt prompt: 200 tokens"):
        ruler_tasks.make_samples(tasks()["vt"], sources, fmt, 200, 1, 42, 30)


# ---------------------------------------------------------------- end to end on a tiny random Llama
TINY_RULER = {
    "name": "tiny-ruler",
    "perplexity": {"enabled": False}, "needle": {"enabled": False}, "agreement": {"enabled": False},
    "ruler": {"enabled": True, "lengths": [1536], "num_samples": 1, "only": ["niah_multikey_3", "vt", "cwe"],
              "max_new_tokens": {"niah": 4, "variable_tracking": 4, "common_words_extraction": 4,
                                 "freq_words_extraction": 4}},
    "methods": [{"name": "full", "method": "full"},
                {"name": "kivi-lossless", "method": "kivi", "residual_length": 4096},
                {"name": "bonsai-1", "method": "bonsai", "residual_length": 0}],
}


def test_generate_side_by_side_uses_a_fresh_cache_and_the_quantized_history(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=128)).eval()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 96, (1, 200))
    specs = [MethodSpec("full", "full"), MethodSpec("kivi-lossless", "kivi", {"residual_length": 1024}),
             MethodSpec("kivi-0", "kivi", {"residual_length": 0})]
    made = []
    make = MethodSpec.make
    monkeypatch.setattr(MethodSpec, "make", lambda self, config: made.append(make(self, config)) or made[-1])
    steps = []
    first = ruler.generate_side_by_side(model, prompt, specs, 6, 64, on_step=lambda: steps.append(1))
    assert len(made) == 3 and len(steps) == 6 and all(len(t) == 6 for t in first)
    assert all(c.get_seq_length() == 200 + 6 - 1 for c in made)  # generate fed every token through each cache
    assert made[2].layers[0].num_quantized == 192 and made[1].layers[0].num_quantized == 0
    again = ruler.generate_side_by_side(model, prompt, specs, 6, 64)
    assert len(made) == 6 and all(c.get_seq_length() == 205 for c in made[3:])  # fresh caches, same answers
    assert again == first
    assert first[1] == first[0]  # window larger than the sequence: lossless
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, 200:].tolist()
    assert first[0] == plain  # the reference row is ordinary greedy decoding


@pytest.mark.slow
def test_ruler_config_end_to_end_tiny(tiny_model_dir, tmp_path):  # noqa: F811
    cfg_path = tmp_path / "tiny_ruler.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY_RULER))
    out = tmp_path / "out"
    assert cli.main(["--config", str(cfg_path), "--model", str(tiny_model_dir), "--dtype", "fp32",
                     "--output-dir", str(out)]) == 0
    for name in ("results.json", "results.csv", "table.md", "ruler_heatmap.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    suite = res["ruler"]
    assert suite["template"] == "plain" and list(suite["tasks"]) == TINY_RULER["ruler"]["only"]
    full, lossless = res["methods"]["full"]["ruler"], res["methods"]["kivi-lossless"]["ruler"]
    assert set(full["scores"]) == set(TINY_RULER["ruler"]["only"]) and list(full["average"]) == ["1536"]
    assert lossless["answers"] == full["answers"]  # window larger than the sequence: identical answers
    for key, items in suite["samples"].items():
        assert all(s["prompt_tokens"] <= 1536 - 4 for s in items), key
    md = (out / "table.md").read_text()
    assert "RULER-style suite: string-match score" in md and "| 1536 tokens |" in md
    assert not (out / "partial.json").exists()  # removed once the full outputs are written


def test_a_run_cut_short_keeps_the_tasks_it_scored(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """The suite writes `partial.json` after every task and length: a run stopped in its second task (a time limit)
    leaves the first task's scores and answers on disk."""
    from tq_transformers.evaluation import ruler

    calls = []

    def fake_task(model, tokenizer, fmt, task, length, items, specs, rcfg, overall):
        calls.append(task.name)
        if len(calls) > 1:
            raise KeyboardInterrupt("stopped")
        return [[s.references[0] for s in items] for _ in specs], [0] * len(items)

    monkeypatch.setattr(ruler, "run_task", fake_task)
    cfg_path = tmp_path / "tiny_ruler.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY_RULER))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--config", str(cfg_path), "--model", str(tiny_model_dir), "--dtype", "fp32",
                  "--output-dir", str(out)])
    partial = json.loads((out / "partial.json").read_text())
    first = TINY_RULER["ruler"]["only"][0]
    for spec in TINY_RULER["methods"]:
        scores = partial["ruler_partial"][spec["name"]]["scores"]
        assert scores[first] == {"1536": 100.0} and scores[TINY_RULER["ruler"]["only"][1]] == {}
    assert not (out / "results.json").exists()


def test_ruler_table_and_heatmap_model_free(tmp_path):
    pytest.importorskip("matplotlib")
    from eval_helpers import fake_results

    from tq_transformers.evaluation import report

    res = fake_results()
    scores = {"full": (100.0, 50.0), "kivi-a": (100.0, 25.0), "kivi-b": (0.0, 50.0)}
    for name, (a, b) in scores.items():
        res["methods"][name]["ruler"] = {"scores": {"vt": {"2048": a}, "cwe": {"2048": b}},
                                         "average": {"2048": (a + b) / 2}, "answers": {}}
    res["ruler"] = {"num_samples": 1, "tasks": {"vt": {}, "cwe": {}}, "template": "chat"}
    res["config"]["ruler"]["enabled"] = True
    text = report.ruler_table(res)
    assert "| 2048 tokens | vt | cwe | avg |" in text and "| kivi-b | 0 | 50 | 25.0 |" in text
    assert [r["ruler_average"] for r in report.rows(res)] == [75.0, 62.5, 25.0]
    assert "RULER-style suite: 2 tasks" in report.header(res)
    import matplotlib.pyplot as plt

    paths = report.plot_ruler(res, tmp_path, plt)
    assert [p.name for p in paths] == ["ruler_heatmap.png"] and paths[0].stat().st_size > 0


def test_progress_counts_steps_not_taken_when_generation_stops_early():
    """An answer planned at its full budget that stops early still completes the overall estimate (a 4K CPU run read
    70% while its last task finished)."""
    from tq_transformers.evaluation.ruler import _Progress
    from tq_transformers.evaluation.runner import forward_units

    class Tally:
        def __init__(self):
            self.n = 0

        def update(self, k):
            self.n += k

        def advance(self, k):
            self.n += k

    bar, overall = Tally(), Tally()
    p = _Progress(bar, overall, rows=2)
    p.prefill(16)
    p.start_generate(rows=6, budget=10)
    for _ in range(3):
        p.step()
    p.end_generate()
    assert bar.n == 16 + 10
    assert overall.n == forward_units(2, 16) + 10 * forward_units(6, 1)
