"""Results: the printed table (the seed's form), results.json, results.csv and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = [
    ("method", "method"),
    ("bits_per_value", "bits/value"),
    ("memory_mib", "mem MiB (L3.1-8B 32K)"),
    ("saving_pct", "saving"),
    ("fidelity", "attn fidelity (worst layer)"),
    ("ppl", "ppl (change)"),
    ("top1", "top-1"),
    ("kl", "KL"),
    ("retrieval", "needle"),
    ("agreement", "greedy agree"),
    ("held", "held here"),
]


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per setting (numbers, None where a part did not run)."""
    out = []
    for name, res in results["methods"].items():
        proj = res["projection"]
        ppl = res.get("perplexity") or {}
        fid = ppl.get("fidelity") or {}
        needle = res.get("needle") or {}
        agree = res.get("agreement") or {}
        out.append({
            "method": name,
            "bits_per_value": proj["bits_per_value"],
            "memory_mib": proj["mib"],
            "saving_pct": proj["saving_pct"],
            "fidelity_mean": fid.get("mean"),
            "fidelity_worst_layer": fid.get("worst_layer"),
            "fidelity_worst_layer_mean": fid.get("worst_layer_mean"),
            "perplexity": ppl.get("perplexity"),
            "perplexity_change_pct": ppl.get("perplexity_change_pct"),
            "top1_agreement": ppl.get("top1_agreement"),
            "kl_divergence": ppl.get("kl_divergence"),
            "needle_accuracy": needle.get("accuracy"),
            "agreement_mean_prefix": agree.get("mean_prefix"),
            "agreement_full_match": agree.get("full_match"),
            "held_bytes": ppl.get("held_bytes"),
            "held_tokens": ppl.get("held_tokens"),
            "estimated_bytes": ppl.get("estimated_bytes"),
        })
    return out


def _fmt(r: dict, key: str, new_tokens: int | None) -> str:
    na = "-"
    if key == "method":
        return r["method"]
    if key == "bits_per_value":
        return f"{r['bits_per_value']:.3f}"
    if key == "memory_mib":
        return f"{r['memory_mib']:.0f}"
    if key == "saving_pct":
        return f"{r['saving_pct']:.1f}%"
    if key == "fidelity":
        if r["fidelity_mean"] is None:
            return na
        worst = "" if r["fidelity_worst_layer"] is None else f" (L{r['fidelity_worst_layer']} {100 * r['fidelity_worst_layer_mean']:.2f}%)"
        return f"{100 * r['fidelity_mean']:.2f}%{worst}"
    if key == "ppl":
        if r["perplexity"] is None:
            return na
        return f"{r['perplexity']:.3f} ({r['perplexity_change_pct']:+.2f}%)"
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
    if key == "held":
        if r["held_bytes"] is None:
            return na
        return f"{r['held_bytes'] / 2**20:.2f} MiB @{r['held_tokens']}"
    raise KeyError(key)


def table(results: dict[str, Any]) -> str:
    """A Markdown table in the seed's form (method, bits a value, memory, saving, fidelity, ppl change, retrieval)."""
    new_tokens = results["config"]["agreement"]["new_tokens"]
    recs = rows(results)
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in recs:
        lines.append("| " + " | ".join(_fmt(r, k, new_tokens) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def needle_table(results: dict[str, Any]) -> str:
    """Needle found (1) or not (0) per setting and length@depth."""
    names = list(results["methods"])
    first = (results["methods"][names[0]].get("needle") or {}).get("found", {})
    if not first:
        return ""
    keys = list(first)
    lines = ["| method | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name in names:
        found = results["methods"][name]["needle"]["found"]
        lines.append(f"| {name} | " + " | ".join(str(int(found[k])) for k in keys) + " |")
    return "\n".join(lines)


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
    paths[2].write_text(table(results) + "\n\n" + needle_table(results) + "\n")
    paths += plot(results, out_dir)
    return paths


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """memory_fidelity.png (projected MiB against attention fidelity) and needle_heatmap.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    written = []
    recs = rows(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in recs:
        if r["fidelity_mean"] is None:
            continue
        ax.scatter(r["memory_mib"], 100 * r["fidelity_mean"])
        ax.annotate(r["method"], (r["memory_mib"], 100 * r["fidelity_mean"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KV cache, Llama-3.1-8B at 32K (MiB)")
    ax.set_ylabel("attention fidelity (mean cosine, %)")
    ax.set_title(f"memory vs fidelity: {results['config']['name']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out_dir / "memory_fidelity.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    names = [n for n in results["methods"] if results["methods"][n].get("needle")]
    if names:
        keys = list(results["methods"][names[0]]["needle"]["found"])
        grid = [[float(results["methods"][n]["needle"]["found"][k]) for k in keys] for n in names]
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(keys), 0.8 + 0.45 * len(names)))
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("context length @ needle depth")
        ax.set_title("needle retrieval (green: found)")
        fig.tight_layout()
        written.append(out_dir / "needle_heatmap.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
