"""Tables, target checks and the plot made from a results folder of `benchmarks/run.py`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GIB = 2**30
# Step-time ratios IA3 / floor, by model (from pair:M when measured, else from jax:M:ia3 / jax:M:floor).
FLOOR_TARGET = 1.03
RATIO_MODELS = ["lean", "hf", "lean-scan", "lean-hidden", "lean-scan-hidden", "lean-scan-remat"]
# (description, numerator variant, denominator variant, field, bound, "le" or "ge")
TARGETS = [
    ("lean IA3 tokens/s / PEFT IA3 tokens/s", "jax:lean:ia3", "torch:peft:ia3", "tokens_per_s", 1.25, "ge"),
    ("lean IA3 peak memory / PEFT IA3 peak", "jax:lean:ia3", "torch:peft:ia3", "peak_bytes", 1.0, "le"),
]


def load(folder: Path) -> dict[str, dict[str, Any]]:
    """``{variant name: result}`` from ``folder/results.json``."""
    data = json.loads((Path(folder) / "results.json").read_text())
    return {r["name"]: r for r in data["results"]}


def _ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and r.get("status") == "ok"


def _ratio(results, a: str, b: str, field: str) -> float | None:
    ra, rb = results.get(a), results.get(b)
    if not (_ok(ra) and _ok(rb)) or not ra.get(field) or not rb.get(field):
        return None
    return ra[field] / rb[field]


def target_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target of issue 6 that the results can answer."""
    rows = []
    for model in RATIO_MODELS:
        pair = results.get(f"pair:{model}")
        if _ok(pair):
            ratio, how = pair["ia3_over_floor"], "alternating rounds, one process"
        else:
            ratio, how = _ratio(results, f"jax:{model}:ia3", f"jax:{model}:floor", "step_s"), "separate processes"
        if ratio is not None:
            verdict = "met" if ratio <= FLOOR_TARGET else "MISSED"
            rows.append((f"{model}: IA3 step / floor step <= {FLOOR_TARGET} ({how})", f"{ratio:.3f}", verdict))
    for what, a, b, field, bound, sense in TARGETS:
        ratio = _ratio(results, a, b, field)
        sign = "<=" if sense == "le" else ">="
        if ratio is None:
            rows.append((f"{what} {sign} {bound}", "not measured", "n/a"))
            continue
        ok = ratio <= bound if sense == "le" else ratio >= bound
        rows.append((f"{what} {sign} {bound}", f"{ratio:.3f}", "met" if ok else "MISSED"))
    for name, r in results.items():
        if not name.startswith("infer:") or not _ok(r):
            continue
        model = name.split(":")[1]
        for shape, f in r["forward"].items():
            base = f["base"]["latency_s"]
            unmerged, merged = f["unmerged"]["latency_s"] / base, f["merged"]["latency_s"] / base
            rows.append((f"{model} {shape}: unmerged forward / base <= 1.02", f"{unmerged:.3f}",
                         "met" if unmerged <= 1.02 else "MISSED"))
            rows.append((f"{model} {shape}: merged forward / base ~ 1.00", f"{merged:.3f}",
                         "met" if merged <= 1.01 else "MISSED"))
        labels = (("jit", "jit_over_floor"), ("jit, input donated", "jit_donated_over_floor"),
                  ("jit over the targeted modules only", "targeted_jit_over_floor"))
        for label, key in labels:
            if key not in r["merge"]:
                continue
            over = r["merge"][key]
            rows.append((f"{model}: merge ({label}) / bandwidth floor <= 2", f"{over:.2f}", "met" if over <= 2 else "MISSED"))
    return rows


def _ms_iqr(m: dict[str, Any]) -> str:
    """``median (q1-q3)`` of a step record, in ms."""
    iqr = m.get("step_s_iqr")
    return f"{1e3 * m['step_s']:.1f}" + (f" ({1e3 * iqr[0]:.1f}-{1e3 * iqr[1]:.1f})" if iqr else "")


def decode_table(results: dict[str, dict[str, Any]]) -> str:
    """Per model and batch size: decode ms/token per variant, and what the per-token time is made of."""
    lines = ["| model | batch | base (ms/token) | unmerged IA3 (ms/token) | merged IA3 (ms/token) | unmerged / base | "
             "merged / base | base tokens/s | generate IQR, base (ms) | per token |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        if not name.startswith("decode:") or not _ok(r):
            continue
        for key, row in r.items():
            if not key.startswith("batch"):
                continue
            t = {v: row[v]["decode_s_per_token"] for v in ("base", "unmerged", "merged")}
            g = row["base"]["generate"]
            lines.append(
                f"| {name} | {key[5:]} | {1e3 * t['base']:.3f} | {1e3 * t['unmerged']:.3f} | {1e3 * t['merged']:.3f} | "
                f"{t['unmerged'] / t['base']:.3f} | {t['merged'] / t['base']:.3f} | "
                f"{row['base']['decode_tokens_per_s']:,.0f} | {1e3 * g['iqr_s'][0]:.1f}-{1e3 * g['iqr_s'][1]:.1f} | "
                f"{_per_token_basis(r)} |"
            )
    return "\n".join(lines)


def _per_token_basis(r: dict[str, Any]) -> str:
    """How a decode result's time per token was computed, e.g. ``(generate - prefill) / 255``."""
    steps = r.get("decode_steps", r["new_tokens"])  # results from before decode_steps: lean, steps = new tokens
    return f"generate / {steps} (prefill included)" if r.get("prefill_included") else f"(generate - prefill) / {steps}"


def issue13_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 13's targets, each with its baseline named."""
    rows: list[tuple[str, str, str]] = []

    def add(what: str, value: float | None, bound: float, sense: str = "le", fmt: str = "{:.3f}") -> None:
        if value is None:
            rows.append((what, "not measured", "n/a"))
        else:
            ok = value <= bound if sense == "le" else value >= bound
            rows.append((what, fmt.format(value), "met" if ok else "MISSED"))

    for model, floor in (("lean-ia3remat", "lean"), ("lean-scan-ia3remat", "lean-scan")):
        add(f"{model} IA3 peak / {floor} floor peak (jax:{floor}:floor) <= 1.05",
            _ratio(results, f"jax:{model}:ia3", f"jax:{floor}:floor", "peak_bytes"), 1.05)
        pair = results.get(f"pair:{model}")
        add(f"{model} IA3 step / {floor} floor step (alternating rounds) <= 1.02",
            pair["ia3_over_floor"] if _ok(pair) else None, 1.02)
        add(f"{model} IA3 step, optax.flatten(adamw) / {floor} floor step (alternating rounds) <= 1.02",
            pair.get("ia3_flat_over_floor") if _ok(pair) else None, 1.02)
    add("lean-ia3remat IA3 peak / compiled PEFT IA3 peak (torch:compile:ia3) <= 1.0",
        _ratio(results, "jax:lean-ia3remat:ia3", "torch:compile:ia3", "peak_bytes"), 1.0)
    torch_ia3 = [n for n in results if n.startswith("torch:") and n.endswith(":ia3") and "ckpt" not in n and _ok(results[n])]
    if torch_ia3:
        best = max(torch_ia3, key=lambda n: results[n]["tokens_per_s"])
        for jax_name in ("jax:lean:ia3", "jax:lean-ia3remat:ia3", "jax:lean-ia3remat:ia3-flat"):
            add(f"{jax_name} tokens/s / best PyTorch PEFT IA3 ({best}) >= 1.2",
                _ratio(results, jax_name, best, "tokens_per_s"), 1.2, "ge")
            add(f"{jax_name} peak / best PyTorch PEFT IA3 ({best}) peak <= 1.0",
                _ratio(results, jax_name, best, "peak_bytes"), 1.0)
    for name, r in results.items():
        if name.startswith("decode:") and _ok(r):
            for key, row in r.items():
                if key.startswith("batch"):
                    base = row["base"]["decode_s_per_token"]
                    add(f"{name} {key}: unmerged / base decode time per token <= 1.03",
                        row["unmerged"]["decode_s_per_token"] / base, 1.03)
                    add(f"{name} {key}: merged / base decode time per token ~ 1.00 (<= 1.01)",
                        row["merged"]["decode_s_per_token"] / base, 1.01)
        if name.startswith("infer:") and _ok(r) and "eager_over_floor" in r.get("merge", {}):
            add(f"{name}: eager merge / bandwidth floor (targeted kernels read + written once) <= 2",
                r["merge"]["eager_over_floor"], 2.0, fmt="{:.2f}")
            add(f"{name}: eager unmerge / bandwidth floor <= 2", r["merge"]["unmerge_eager_over_floor"], 2.0, fmt="{:.2f}")
            add(f"{name}: merge under jax.jit with the input donated / bandwidth floor <= 2",
                r["merge"]["jit_donated_over_floor"], 2.0, fmt="{:.2f}")
    return rows


def _ms(x: float | None) -> str:
    return f"{1e3 * x:.3f}" if x is not None else "n/a"


def _gib(x: Any) -> str:
    return f"{x / GIB:.2f}" if x else "n/a"


def _floor_of(name: str) -> str:
    """The floor variant of a training variant: its mode part (``ia3``, ``full``) replaced by ``floor``."""
    parts = name.split(":")
    mode_at = 2 if parts[0] in ("torch", "tunix") else len(parts) - 1
    return ":".join(parts[:mode_at] + ["floor"] + parts[mode_at + 1 :])


def _is_tunix_comparison(name: str) -> bool:
    return name.startswith("tunix:") or (name.startswith("torch:") and name.endswith(":llama32-1b"))


def training_table(results: dict[str, dict[str, Any]], tunix: bool = False) -> str:
    """One row per training variant: the lean/HF comparison (default) or issue 12's Tunix comparison."""
    lines = [
        "| variant | tokens/s | step (ms) | step IQR (ms) | peak (GiB) | step vs its floor | trainable params | compile (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if not name.startswith(("jax:", "torch:", "tunix:")) or _is_tunix_comparison(name) != tunix:
            continue
        if not _ok(r):
            err = str(r.get("error", "")).splitlines()[0][:120] if r.get("error") else ""
            lines.append(f"| {name} | {r.get('status')} | | | | | | {err} |")
            continue
        pair = results.get(f"pair:{name.split(':')[1]}") if name.startswith("jax:") else None
        if name.endswith(":ia3") and _ok(pair):  # the alternating-rounds ratio is the one to trust
            vs = pair["ia3_over_floor"]
        else:
            vs = _ratio(results, name, _floor_of(name), "step_s")
        compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else ""
        iqr = r.get("step_s_iqr")
        iqr_s = f"{1e3 * iqr[0]:.1f}-{1e3 * iqr[1]:.1f}" if iqr else ""
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_s']:.1f} | {iqr_s} | {_gib(r.get('peak_bytes'))} | "
            f"{'' if vs is None else f'{vs:.3f}x'} | {r.get('trainable_params', 0):,} | {compile_s} |"
        )
    return "\n".join(lines)


def issue12_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target or comparison, measured, verdict) for issue 12's Tunix benchmark."""
    ia3 = "tunix:llama32-1b:ia3"
    ratio = _ratio(results, ia3, "tunix:llama32-1b:floor", "step_s")
    rows = [(f"{ia3} step / its floor (tunix:llama32-1b:floor) <= 1.03", "not measured" if ratio is None else
             f"{ratio:.3f}", "n/a" if ratio is None else "met" if ratio <= 1.03 else "MISSED")]
    for torch_name in ("torch:peft:ia3:llama32-1b", "torch:compile:ia3:llama32-1b"):
        for field, what in (("tokens_per_s", "tokens/s"), ("peak_bytes", "peak")):
            value = _ratio(results, ia3, torch_name, field)
            rows.append((f"{ia3} {what} / {torch_name} {what}", "not measured" if value is None else f"{value:.3f}",
                         "reported"))
    return rows


def pair_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| IA3 model | floor model | IA3 step (ms) | floor step (ms) | IA3 / floor |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        if name.startswith("pair:") and _ok(r):
            m = r["modes"]
            lines.append(f"| {name[5:]} | {r.get('floor_model', name[5:])} | {_ms_iqr(m['ia3'])} | "
                         f"{_ms_iqr(m['floor'])} | {r['ia3_over_floor']:.3f} |")
    return "\n".join(lines)


def inference_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | batch x seq | base (ms) | unmerged IA3 (ms) | merged IA3 (ms) | merged vs unmerged rel. err |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    merges = ["| model | targeted kernels | bytes r+w | copy bandwidth | floor (ms) | jit merge (ms) | "
              "jit, donated (ms) | jit, targeted modules (ms) | eager (ms) | host dispatch of the tree (ms) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        if not name.startswith("infer:"):
            continue
        if not _ok(r):
            lines.append(f"| {name} | {r.get('status')} | | | | |")
            continue
        for shape, f in r["forward"].items():
            lines.append(
                f"| {name} | {shape} | {1e3 * f['base']['latency_s']:.2f} | {1e3 * f['unmerged']['latency_s']:.2f} "
                f"| {1e3 * f['merged']['latency_s']:.2f} | {f['merged_vs_unmerged_rel_err']:.1e} |"
            )
        m = r["merge"]
        merges.append(
            f"| {name} | {m['targeted_kernels']} | {m['floor_bytes'] / 1e9:.2f} GB | "
            f"{m['copy_bandwidth_Bps'] / 1e12:.2f} TB/s | {1e3 * m['floor_s']:.3f} | {1e3 * m['jit_s']:.3f} | "
            f"{1e3 * m['jit_donated_s']:.3f} | {_ms(m.get('targeted_jit_s'))} | {1e3 * m['eager_s']:.1f} | "
            f"{_ms(m.get('whole_tree_dispatch_s'))} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(merges)


def markdown(results: dict[str, dict[str, Any]]) -> str:
    targets = ["| target | measured | verdict |", "| --- | ---: | --- |"]
    targets += [f"| {a} | {b} | {c} |" for a, b, c in target_rows(results)]
    issue13 = ["| target | measured | verdict |", "| --- | ---: | --- |"]
    issue13 += [f"| {a} | {b} | {c} |" for a, b, c in issue13_rows(results)]
    tunix = ""
    if any(_is_tunix_comparison(name) for name in results):
        issue12 = ["| target | measured | verdict |", "| --- | ---: | --- |"]
        issue12 += [f"| {a} | {b} | {c} |" for a, b, c in issue12_rows(results)]
        tunix = (
            "\n### IA3 on Tunix's Llama-3.2-1B (NNX) against PyTorch PEFT on the same configuration\n\n"
            + training_table(results, tunix=True) + "\n\n" + "\n".join(issue12) + "\n"
        )
    return (
        "### Training (one AdamW step per iteration)\n\n" + training_table(results)
        + "\n\n### IA3 against the floor, alternating rounds in one process\n\n" + pair_table(results)
        + "\n\n### Inference and merge\n\n" + inference_table(results)
        + "\n\n### Greedy decoding with a KV cache (lean model; hf: FlaxLlamaForCausalLM.generate)\n\n"
        + decode_table(results)
        + "\n\n### Targets\n\n" + "\n".join(targets)
        + "\n\n### Targets of issue 13\n\n" + "\n".join(issue13) + "\n" + tunix
    )


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Horizontal bars: tokens/s and peak memory per training variant (failed variants labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n.startswith(("jax:", "torch:")) and not _is_tunix_comparison(n)]
    colors = {"ia3": "tab:blue", "floor": "tab:gray", "full": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    for ax, field, label, unit in (
        (axes[0], "tokens_per_s", "tokens/s (higher is better)", 1.0),
        (axes[1], "peak_bytes", "peak device memory, GiB (lower is better)", GIB),
    ):
        for i, name in enumerate(names):
            r = results[name]
            value = r.get(field) if _ok(r) else None
            if value:
                ax.barh(i, value / unit, color=colors.get(name.rsplit(":", 1)[1], "tab:green"))
                ax.text(value / unit, i, f" {value / unit:,.0f}" if unit == 1 else f" {value / unit:.1f}",
                        va="center", fontsize=8)
            else:
                ax.text(0, i, f" {r.get('status', 'n/a')}", va="center", fontsize=8, color="red")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("IA3 training step, Llama ~1.1B, bf16, batch 8 x 1024")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(folder: Path) -> str:
    """Writes ``summary.md`` and ``plot.png`` into `folder`; returns the markdown."""
    folder = Path(folder)
    results = load(folder)
    text = markdown(results)
    (folder / "summary.md").write_text(text)
    plot(results, folder / "plot.png")
    return text


# The first H200 run (results/20261128-2017) used older model names: "lean" was then scanned,
# "lean-unrolled" is today's "lean".
FIRST_RUN_NAMES = {
    "jax:lean:ia3": "jax:lean-scan:ia3",
    "jax:lean:floor": "jax:lean-scan:floor",
    "jax:lean:full": "jax:lean-scan:full",
    "jax:lean-remat:ia3": "jax:lean-scan-remat:ia3",
    "jax:lean-remat:floor": "jax:lean-scan-remat:floor",
    "jax:lean-remat:full": "jax:lean-scan-remat:full",
    "jax:lean-unrolled:ia3": "jax:lean:ia3",
    "jax:lean-unrolled:floor": "jax:lean:floor",
    "infer:lean": "infer:lean-scan",
}


def combine(folders: list[Path], out: Path, renames: dict[Path, dict[str, str]] | None = None) -> None:
    """Merges the ``results.json`` of several runs into `out` (a later run wins per variant name).

    `renames` maps a folder to ``{old name: new name}`` for runs made under older variant names.
    """
    merged: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for name, r in load(folder).items():
            new = (renames or {}).get(folder, {}).get(name, name)
            merged[new] = {**r, "name": new, "run": Path(folder).name}
            if new != name:
                merged[new]["name_in_run"] = name
    kept = [r for r in merged.values() if r.get("status") not in ("skipped", "timeout")]  # cut by a deadline
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": sorted(kept, key=lambda r: _order(r["name"]))}, indent=1))


# What a run folder keeps once consolidated: its combined JSON (plus the merged summary and plot at
# the top of results/) and any HLO dump (``*.hlo.txt.gz``) that RESULTS.md cites. Per-variant JSONs
# duplicate entries of results.json; logs are working files of the run.
RUN_EXTRAS = {"env.txt": "machine", "scaling.json": "scaling", "quantized.json": "quantized"}


def consolidate(folder: Path) -> list[str]:
    """Folds a run folder into its one ``results.json``; returns the names of the files removed.

    ``env.txt`` becomes ``"machine"`` (its lines), ``scaling.json`` / ``quantized.json`` (issues 5 and 7)
    become ``"scaling"`` / ``"quantized"``; every per-variant ``<variant>.json`` must equal its entry in
    ``results.json`` (else nothing is removed and ValueError names it); logs and the per-run
    ``summary.md`` / ``plot.png`` (rebuilt by `write` on the combined folder) are removed; gzipped HLO
    dumps are kept.
    """
    folder = Path(folder)
    data = json.loads((folder / "results.json").read_text())
    by_name = {r["name"]: r for r in data["results"]}
    remove = []
    for path in sorted(folder.iterdir()):
        if path.name == "results.json" or path.name.endswith(".hlo.txt.gz"):
            continue
        if path.name in RUN_EXTRAS:
            text = path.read_text()
            data[RUN_EXTRAS[path.name]] = json.loads(text) if path.suffix == ".json" else text.splitlines()
        elif path.suffix == ".json":
            variant = json.loads(path.read_text())
            if by_name.get(variant.get("name")) != variant:
                raise ValueError(f"{path}: not the same as its entry in results.json; nothing removed")
        elif not (path.suffix == ".log" or path.name in ("summary.md", "plot.png")):
            raise ValueError(f"{path}: unknown file in a run folder; nothing removed")
        remove.append(path)
    (folder / "results.json").write_text(json.dumps(data, indent=1))
    for path in remove:
        path.unlink()
    return [p.name for p in remove]


def _order(name: str) -> tuple:
    kinds = ["jax", "torch", "tunix", "pair", "infer", "decode"]
    models = ["lean", "lean-ia3remat", "lean-hidden", "lean-scan", "lean-scan-ia3remat", "lean-scan-hidden",
              "lean-scan-remat", "hf", "peft", "compile", "compile-liger", "compile-ckpt"]
    modes = ["ia3", "floor", "full"]
    kind, model, *mode = name.split(":")
    index = lambda seq, x: seq.index(x) if x in seq else len(seq)
    return index(kinds, kind), index(models, model), index(modes, mode[0] if mode else "")
