"""Results: the printed report (what was run, the table, its key, needle cells, timings), results.json, results.csv
and table.md; the PNG plots are drawn by ``plots``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

# the plots live in .plots (one home); these names stay importable from here
from .plots import FOUND_COLOUR, MISSED_COLOUR, plot, plot_ruler  # noqa: F401

COLUMNS = [
    ("method", "method"),
    ("bits_per_value", "proj. bits/value"),
    ("memory_mib", "proj. MiB (L3.1-8B 32K)"),
    ("saving_pct", "proj. saving"),
    ("fidelity", "attn fidelity (worst layer)"),
    ("ppl", "ppl (change)"),
    ("ppl_ci", "change 95% CI"),
    ("top1", "top-1"),
    ("kl", "KL"),
    ("retrieval", "needle"),
    ("agreement", "greedy agree"),
    ("ruler", "RULER avg"),
    ("held", "held (measured)"),
]

#: Below this many scored tokens the key warns that perplexity changes and their intervals are rough (the default
#: run scores 256 tokens; --quick scores 32).
FEW_SCORED_TOKENS = 256

def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per setting (numbers, None where a part did not run)."""
    out = []
    for name, res in results["methods"].items():
        proj = res["projection"]
        ppl = res.get("perplexity") or {}
        fid = ppl.get("fidelity") or {}
        needle = res.get("needle") or {}
        agree = res.get("agreement") or {}
        ruler = res.get("ruler") or {}
        ci = ppl.get("perplexity_change_ci_pct") or [None, None]
        out.append({
            "method": name,
            "label": res.get("label", name),
            "bits_per_value": proj["bits_per_value"],
            "memory_mib": proj["mib"],
            "saving_pct": proj["saving_pct"],
            "fidelity_mean": fid.get("mean"),
            "fidelity_worst_layer": fid.get("worst_layer"),
            "fidelity_worst_layer_mean": fid.get("worst_layer_mean"),
            "perplexity": ppl.get("perplexity"),
            "perplexity_change_pct": ppl.get("perplexity_change_pct"),
            "perplexity_change_ci_low_pct": ci[0],
            "perplexity_change_ci_high_pct": ci[1],
            "change_interval_includes_zero": ppl.get("change_interval_includes_zero"),
            "top1_agreement": ppl.get("top1_agreement"),
            "kl_divergence": ppl.get("kl_divergence"),
            "scored_tokens": ppl.get("scored_tokens"),
            "needle_accuracy": needle.get("accuracy"),
            "agreement_mean_prefix": agree.get("mean_prefix"),
            "agreement_full_match": agree.get("full_match"),
            "ruler_average": (sum(ruler["average"].values()) / len(ruler["average"])) if ruler.get("average") else None,
            "held_bytes": ppl.get("held_bytes"),
            "held_tokens": ppl.get("held_tokens"),
            "estimated_bytes": ppl.get("estimated_bytes"),
        })
    return out


def _fmt(r: dict, key: str, new_tokens: int | None) -> str:
    na = "-"
    if key == "method":
        return r["label"]
    if key == "bits_per_value":
        return f"{r['bits_per_value']:.3f}"
    if key == "memory_mib":
        return f"{r['memory_mib']:.0f}"
    if key == "saving_pct":
        return f"{r['saving_pct']:.1f}%"
    if key == "fidelity":
        if r["fidelity_mean"] is None:
            return na
        worst = ("" if r["fidelity_worst_layer"] is None
                 else f" (L{r['fidelity_worst_layer']} {100 * r['fidelity_worst_layer_mean']:.2f}%)")
        return f"{100 * r['fidelity_mean']:.2f}%{worst}"
    if key == "ppl":
        if r["perplexity"] is None:
            return na
        return f"{r['perplexity']:.3f} ({r['perplexity_change_pct']:+.2f}%)"
    if key == "ppl_ci":
        lo, hi = r["perplexity_change_ci_low_pct"], r["perplexity_change_ci_high_pct"]
        if lo is None:
            return na
        return f"[{lo:+.2f}, {hi:+.2f}]" + (" n.s." if r["change_interval_includes_zero"] else "")
    if key == "top1":
        return na if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
    if key == "kl":
        return na if r["kl_divergence"] is None else f"{r['kl_divergence']:.4f}"
    if key == "retrieval":
        return na if r["needle_accuracy"] is None else f"{100 * r['needle_accuracy']:.0f}%"
    if key == "agreement":
        if r["agreement_mean_prefix"] is None:
            return na
        return f"{r['agreement_mean_prefix']:.1f}/{new_tokens}"
    if key == "ruler":
        return na if r["ruler_average"] is None else f"{r['ruler_average']:.1f}"
    if key == "held":
        if r["held_bytes"] is None:
            return na
        return f"{r['held_bytes'] / 2**20:.2f} MiB @{r['held_tokens']}"
    raise KeyError(key)


def _ran(results: dict[str, Any], part: str) -> bool:
    return any(res.get(part) for res in results["methods"].values())


def _reference_label(results: dict[str, Any]) -> str:
    first = next(iter(results["methods"].values()))
    return first.get("label", next(iter(results["methods"])))


def model_line(results: dict[str, Any]) -> str:
    """'<model> (<description>), <dtype> on <device>' of a results dict (older results: from the config)."""
    cfg = results["config"]
    model = results.get("model") or {"name": cfg["model"], "dtype": cfg["dtype"], "device": cfg["device"]}
    desc = f" ({model['description']})" if model.get("description") else ""
    return f"{model['name']}{desc}, {model['dtype']} on {model['device']}"


def header(results: dict[str, Any]) -> str:
    """What was evaluated: model, dtype, device, and the token counts behind each column."""
    cfg = results["config"]
    ref = _reference_label(results)
    lines = [f"Model: {model_line(results)}. Reference: {ref}, a DynamicCache in the model dtype."]
    if _ran(results, "perplexity"):
        p = cfg["perplexity"]
        ref = next(iter(results["methods"].values()))["perplexity"]
        lines.append(
            f"Perplexity, top-1, KL, fidelity: {p['segments']} segment(s) of {p['data']}, each a {p['context_length']}"
            f"-token context then {p['continuation_length']} scored tokens fed in chunks of {p['chunk_size']}; "
            f"{ref['scored_tokens']} scored tokens per setting.")
    if _ran(results, "needle"):
        n = cfg["needle"]
        lines.append(
            f"Needle: {len(n['lengths']) * len(n['depths'])} prompt(s) in {n['haystack']} (lengths "
            f"{', '.join(map(str, n['lengths']))} x depths {', '.join(f'{d:g}' for d in n['depths'])}), "
            f"{n['max_new_tokens']} greedy tokens each.")
    if _ran(results, "agreement"):
        a = cfg["agreement"]
        lines.append(f"Greedy agreement: {a['num_prompts']} prompt(s) of {a['prompt_length']} tokens of {a['data']}, "
                     f"{a['new_tokens']} greedy tokens each.")
    if _ran(results, "ruler"):
        r, suite = cfg["ruler"], results.get("ruler") or {}
        lines.append(
            f"RULER-style suite: {len(suite.get('tasks', {}))} tasks x lengths {', '.join(map(str, r['lengths']))} x "
            f"{r['num_samples']} sample(s), {suite.get('template', '?')} prompts; haystack {r['haystack']}, words "
            f"{r['words']}, seed {r['seed']}; greedy generate through a fresh cache of every setting, in left-padded "
            f"batches of up to {r.get('batch_size', 1)} samples.")
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    """A Markdown table: projected memory, fidelity, perplexity change and its interval, top-1, KL, needle, greedy
    agreement and the measured cache size."""
    new_tokens = results["config"]["agreement"]["new_tokens"]
    recs = rows(results)
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in recs:
        lines.append("| " + " | ".join(_fmt(r, k, new_tokens) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def key(results: dict[str, Any]) -> str:
    """What each column of `table` means, with this run's lengths, counts and model."""
    cfg = results["config"]
    proj = cfg["projection"]
    ref = _reference_label(results)
    model = (results.get("model") or {}).get("name", cfg["model"])
    boot = results.get("bootstrap") or {}
    recs = rows(results)
    lines = ["Key:"]
    lines.append(
        f"- proj. bits/value, proj. MiB, proj. saving: a projection, not a measurement: the analytic cache size of "
        f"Llama-3.1-8B (32 layers, 8 KV heads of 128) at {proj['seq_len']} tokens, batch {proj['batch_size']}, fp16 "
        f"model, codes + scales/norms + full-precision window (estimate_cache_bytes); saving against its fp16 cache.")
    if _ran(results, "perplexity"):
        scored = recs[0]["scored_tokens"]
        held = recs[0]["held_tokens"]
        lines.append(
            f"- attn fidelity: cosine of each layer's attention output from the method's cache against the exact "
            f"keys and values, same queries, mean over layers, heads and the {scored} scored tokens of {model}; in "
            f"brackets the worst layer (index and its mean).")
        lines.append(
            f"- ppl (change): perplexity of the {scored} scored tokens fed through the cache, and its change against "
            f"{ref}.")
        lines.append(
            f"- change 95% CI: {100 * boot.get('level', 0.95):.0f}% interval of that change from a paired moving-block "
            f"bootstrap over the scored tokens (blocks of {boot.get('block', '?')}, {boot.get('resamples', '?')} "
            f"resamples); n.s. = the interval includes 0: at {scored} tokens the change cannot be told from noise. "
            f"The interval covers the resampling of these tokens only, not other texts.")
        if scored < FEW_SCORED_TOKENS:
            lines.append(
                f"- Only {scored} scored tokens: perplexity changes (either sign) and their intervals are rough; a "
                f"quantized cache does not improve the model. Use the full run (or more segments) for perplexity.")
        lines.append(
            f"- top-1: share of the scored positions whose arg-max token equals {ref}'s. KL: mean KL(P_ref || P_method)"
            f" over them, nats.")
        mismatch = [r["label"] for r in recs if r["held_bytes"] is not None and r["held_bytes"] != r["estimated_bytes"]]
        agree = ("equal to the analytic estimate for every setting" if not mismatch
                 else f"differs from the analytic estimate for {', '.join(mismatch)}")
        lines.append(f"- held (measured): bytes the cache holds on {model} after the perplexity pass ({held} tokens: "
                     f"context + scored tokens); {agree}.")
    if _ran(results, "needle"):
        n = cfg["needle"]
        count = len(n["lengths"]) * len(n["depths"])
        lines.append(f"- needle: share of the {count} needle prompt(s) whose greedy answer contains "
                     f"{n['answer']!r}; per prompt in the next table.")
    if _ran(results, "ruler"):
        lines.append("- RULER avg: RULER's string-match score (share of the expected values contained in the answer, "
                     "percent), mean over tasks and lengths; per task and length in the RULER table.")
    if _ran(results, "agreement"):
        a = cfg["agreement"]
        lines.append(f"- greedy agree: greedy tokens identical to {ref}'s before the first divergence, mean over "
                     f"{a['num_prompts']} prompt(s), of {a['new_tokens']} generated.")
    lines.append("- All settings run side by side in one batch on the same tokens; '-': not run.")
    return "\n".join(lines)


def needle_table(results: dict[str, Any]) -> str:
    """Needle found (1) or not (0) per setting and length@depth."""
    names = list(results["methods"])
    first = (results["methods"][names[0]].get("needle") or {}).get("found", {})
    if not first:
        return ""
    keys = list(first)
    lines = ["Needle found (1) or not (0), per prompt length @ needle depth (fraction of the text before it):",
             "", "| method | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name in names:
        found = results["methods"][name]["needle"]["found"]
        label = results["methods"][name].get("label", name)
        lines.append(f"| {label} | " + " | ".join(str(int(found[k])) for k in keys) + " |")
    return "\n".join(lines)


def ruler_table(results: dict[str, Any]) -> str:
    """RULER scores (percent) per setting and task, one Markdown table per length, with the mean over tasks."""
    names = [n for n in results["methods"] if results["methods"][n].get("ruler")]
    if not names:
        return ""
    first = results["methods"][names[0]]["ruler"]
    tasks, lengths = list(first["scores"]), list(first["average"])
    samples = (results.get("ruler") or {}).get("num_samples", "?")
    out = [f"RULER-style suite: string-match score, percent ({samples} sample(s) per task and length):"]
    for length in lengths:
        lines = [f"| {length} tokens | " + " | ".join(tasks) + " | avg |", "|" + "---|" * (len(tasks) + 2)]
        for name in names:
            res = results["methods"][name]["ruler"]
            label = results["methods"][name].get("label", name)
            cells = [f"{res['scores'][t][length]:.0f}" for t in tasks]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {res['average'][length]:.1f} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


_PHASES = {"load_model": "load model", "perplexity": "perplexity + fidelity", "needle": "needle",
           "agreement": "greedy agreement", "ruler": "RULER suite", "total": "total"}


def timings_table(results: dict[str, Any]) -> str:
    """Seconds per phase, as a small Markdown table (with the machine it ran on)."""
    m = results.get("machine") or {}
    where = m.get("gpu") or f"{m.get('device', '?')}, {m.get('threads', '?')} threads"
    lines = [f"Timings ({where}):", "", "| phase | seconds |", "|---|---|"]
    for k, v in results["timings_s"].items():
        lines.append(f"| {_PHASES.get(k, k)} | {v:.1f} |")
    return "\n".join(lines)


def report_text(results: dict[str, Any]) -> str:
    """The whole printed report: header, table, key, needle cells and timings."""
    parts = [header(results), table(results), key(results), needle_table(results), ruler_table(results),
             timings_table(results)]
    return "\n\n".join(p for p in parts if p)


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """results.json, results.csv, table.md and the plots into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.csv", out_dir / "table.md"]
    paths[0].write_text(json.dumps(results, indent=2, default=str))
    recs = rows(results)
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(recs[0]))
        writer.writeheader()
        writer.writerows(recs)
    paths[2].write_text(report_text(results) + "\n")
    paths += plot(results, out_dir)
    return paths
