"""`colossus report RUN`: RUN/report.md and RUN/report.html with PNG figures, from the run's own files
(metrics.jsonl, events.jsonl, ledger.json, summary.json, config.toml)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colossus.errors import UserError
from colossus.files import atomic_file, write_atomic

# Events worth a line on the loss curve, with their colours.
MARKED_EVENTS = {"resume": "C2", "rollback": "C3", "preempted": "C1", "hang": "C3", "threshold_crossed": "C4",
                 "init_from": "C5"}


@dataclass
class RunRecords:
    steps: dict[int, dict[str, Any]]  # the last record of each training step (a resumed run logs some twice)
    validation: dict[int, float]
    events: list[dict[str, Any]]
    ledger: dict[str, Any] | None
    summary: dict[str, Any] | None
    config: str
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not JSON; the file is damaged") from None
    return rows


def read_run(run: Path) -> RunRecords:
    if not run.is_dir():
        raise UserError(f"{run} is not a run folder; give the --out folder of `colossus train`")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run} has no metrics.jsonl; is it a run folder of `colossus train`?")
    steps, validation = {}, {}
    for record in _jsonl(metrics):
        if "val_loss" in record:
            validation[record["step"]] = record["val_loss"]
        elif "loss" in record:
            steps[record["step"]] = record
    load = lambda name: json.loads((run / name).read_text()) if (run / name).is_file() else None  # noqa: E731
    config = (run / "config.toml").read_text() if (run / "config.toml").is_file() else ""
    return RunRecords(dict(sorted(steps.items())), dict(sorted(validation.items())), _jsonl(run / "events.jsonl"),
                      load("ledger.json"), load("summary.json"), config)


def make_figures(run: Path, records: RunRecords) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(records.steps)

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        with atomic_file(run / name) as handle:
            fig.savefig(handle, dpi=110, format="png")
        plt.close(fig)
        records.figures.append((name, caption))

    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(steps, [records.steps[s]["loss"] for s in steps], label="training loss", color="C0", lw=1.2)
    if records.validation:
        ax.plot(list(records.validation), list(records.validation.values()), "o-", label="validation loss", color="C1")
    if records.summary and records.summary.get("unigram_val_loss"):
        ax.axhline(records.summary["unigram_val_loss"], ls=":", color="gray", label="unigram baseline")
    seen = set()
    for event in records.events:
        colour = MARKED_EVENTS.get(event["event"])
        step = event.get("step", event.get("to_step"))
        if colour and step is not None:
            ax.axvline(step, color=colour, ls="--", lw=0.9, label=event["event"] if event["event"] not in seen else None)
            seen.add(event["event"])
    skipped = [e["step"] for e in records.events if e["event"] == "skipped_step"]
    if skipped:
        ax.plot(skipped, [records.steps.get(s, {}).get("loss", float("nan")) for s in skipped], "x", color="C3",
                label="skipped step (non-finite)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "report_loss.png", "Training and validation loss; dashed lines mark resumes, rollbacks and stops.")

    mfu = [records.steps[s].get("mfu") for s in steps]
    has_mfu = any(v is not None for v in mfu)
    fig, axes = plt.subplots(2 if has_mfu else 1, 1, figsize=(8, 4.8 if has_mfu else 3.2), sharex=True, squeeze=False)
    axes[0][0].plot(steps, [records.steps[s].get("tokens_per_s", 0) for s in steps], color="C0")
    axes[0][0].set_ylabel("tokens/s")
    axes[0][0].set_title("Throughput (all ranks) and model FLOPs utilisation")
    if has_mfu:  # proportional to tokens/s within a run, but its own scale says how close to the peak
        axes[1][0].plot(steps, [100 * (v or 0) for v in mfu], color="C1")
        axes[1][0].set_ylabel("MFU (%)")
    for row in axes:
        row[0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    save(fig, "report_throughput.png", "Tokens per second (all ranks) and model FLOPs utilisation over the run.")

    loads = [(s, records.steps[s]["expert_load"]) for s in steps if records.steps[s].get("expert_load")]
    if loads:
        import numpy as np

        per_step = np.array([np.mean(np.array(load), axis=0) for _, load in loads])  # mean over layers
        fig, (heat, spread) = plt.subplots(2, 1, figsize=(8, 5.2), sharex=True,
                                           gridspec_kw={"height_ratios": [2, 1]})
        image = heat.imshow(per_step.T, aspect="auto", origin="lower", cmap="viridis",
                            extent=(loads[0][0], loads[-1][0], -0.5, per_step.shape[1] - 0.5))
        heat.set_ylabel("expert")
        heat.set_title("Expert load (share of routed tokens, mean over layers)")
        fig.colorbar(image, ax=heat, fraction=0.03)
        layers = np.array([np.array(load) for _, load in loads])  # steps x layers x experts
        balance = layers.std(axis=2) / layers.mean(axis=2)
        spread.plot([s for s, _ in loads], balance.max(axis=1), label="worst layer")
        spread.plot([s for s, _ in loads], balance.mean(axis=1), label="mean over layers")
        spread.set_ylabel("imbalance (CV)")
        spread.set_xlabel("step")
        spread.grid(alpha=0.3)
        spread.legend(fontsize=8)
        save(fig, "report_experts.png", "Router load per expert over training, and its imbalance "
                                        "(coefficient of variation across experts; 0 is perfectly even).")


def _rows_ledger(ledger: dict[str, Any]) -> list[tuple[str, str]]:
    lost = ledger.get("lost", {})
    rows = [("tokens trained", f"{ledger['tokens']:,}"),
            ("model FLOPs (6 N + attention, from modelmath)", f"{ledger['model_flops']:.4g}"),
            ("hardware FLOPs (with recomputation)", f"{ledger['hardware_flops']:.4g}"),
            ("torch flop counter / formula (first step)", f"{ledger['flop_counter_ratio']:.4f}" if ledger.get("flop_counter_ratio") else "-"),
            ("device-hours", f"{ledger['gpu_hours']:.4g}"),
            ("energy (kWh)", f"{ledger['energy_kwh']:.4g}"),
            ("cost (USD)", f"{ledger['cost_usd']:.4g}"),
            ("lost to interruptions and rollbacks", f"{lost.get('steps', 0)} steps, {lost.get('model_flops', 0):.4g} FLOPs"),
            ("cumulative model FLOPs (with the runs it started from)", f"{ledger['cumulative_model_flops']:.4g}")]
    if ledger.get("lineage"):
        rows.append(("started from", f"{ledger['lineage']['run']} step {ledger['lineage'].get('step')}"))
    return rows


def _threshold_rows(ledger: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in ledger.get("thresholds", []):
        state = "crossed" if t["crossed"] else ("n/a" if not t["applies"] else f"at step {t.get('crosses_at_step', '-')}")
        rows.append([t["name"], f"{t['limit_flops']:.0e}" + (f" and ${t['limit_usd']:,.0f}" if t.get("limit_usd") else ""),
                     t["scope"], t["status"], state, t["asks"]])
    return rows


def _segment_rows(ledger: dict[str, Any]) -> list[list[str]]:
    return [[str(s["index"]), str(s["start_step"]), str(s["step"]), str(s["steps_computed"]), str(s["lost_steps"]),
             f"{s['model_flops']:.3g}", f"{s['gpu_hours']:.3g}", s["status"]] for s in ledger.get("segments", [])]


def _planner_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The run's measured step time and peak memory beside the planner's prediction for it."""
    measured, predicted = summary.get("measured"), summary.get("predicted")
    if not measured:
        return []
    rows = []
    for name, key, unit in (("step time", "step_time_s", "s"), ("peak memory", "peak_memory_gib", "GiB")):
        guess = predicted.get(key) if predicted else None
        rows.append([name, f"{guess:.4g} {unit}" if guess else "-", f"{measured[key]:.4g} {unit}",
                     f"{measured[key] / guess - 1:+.1%}" if guess else "-"])
    return rows


PLANNER_HEADER = ["", "planner predicted", "measured", "error (measured / predicted - 1)"]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run: Path) -> tuple[Path, Path]:
    """Write RUN/report.md, RUN/report.html and their figures; returns the two report paths."""
    run = Path(run)
    records = read_run(run)
    if not records.steps:
        raise UserError(f"{run}/metrics.jsonl has no training steps yet; train first")
    make_figures(run, records)
    last = records.steps[max(records.steps)]
    summary = records.summary or {}
    overview = [["steps", str(max(records.steps))],
                ["final training loss", f"{last['loss']:.4f}"],
                ["final validation loss", f"{summary['val_loss']:.4f}" if summary.get("val_loss") else "-"],
                ["unigram baseline", f"{summary['unigram_val_loss']:.4f}" if summary.get("unigram_val_loss") else "-"],
                ["tokens/s (last)", f"{last.get('tokens_per_s', 0):,.0f}"],
                ["MFU (last)", f"{last['mfu']:.1%}" if last.get("mfu") is not None else "-"],
                ["training time", f"{last.get('elapsed_s', 0) / 60:.1f} min"]]
    events = [[str(e.get("step", e.get("to_step", ""))), e["event"],
               ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "step", "time"))]
              for e in records.events if e["event"] not in ("checkpoint",)]
    checkpoints = sum(1 for e in records.events if e["event"] == "checkpoint")
    ledger = records.ledger

    md = [f"# Run report: {run.name}", "", _markdown_table(["", ""], overview), ""]
    for name, caption in records.figures:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    planner = _planner_rows(summary)
    if planner:
        md += ["## The planner against this run", "", _markdown_table(PLANNER_HEADER, planner), ""]
    md += ["## Interruptions, restarts and other events", "",
           f"{checkpoints} checkpoints written. " + ("Other events:" if events else "No other events."), ""]
    if events:
        md += [_markdown_table(["step", "event", "details"], events), ""]
    if ledger:
        md += ["## Compute ledger", "", _markdown_table(["", ""], [list(r) for r in _rows_ledger(ledger)]), "",
               "Segments (one per start or restart):", "",
               _markdown_table(["#", "from step", "to step", "steps run", "lost", "model FLOPs", "device-h", "status"],
                               _segment_rows(ledger)), "",
               "## Regulatory thresholds", "",
               _markdown_table(["name", "limit", "counts", "status", "this run", "what it asks"], _threshold_rows(ledger)), ""]
    md += ["## Configuration", "", "```toml", records.config.strip(), "```", ""]
    md_path = run / "report.md"
    write_atomic(md_path, "\n".join(md))

    parts = [f"<h1>Run report: {html.escape(run.name)}</h1>", _html_table(["", ""], overview)]
    for name, caption in records.figures:
        parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if planner:
        parts += ["<h2>The planner against this run</h2>", _html_table(PLANNER_HEADER, planner)]
    parts.append("<h2>Interruptions, restarts and other events</h2>")
    parts.append(f"<p>{checkpoints} checkpoints written.</p>")
    if events:
        parts.append(_html_table(["step", "event", "details"], events))
    if ledger:
        parts += ["<h2>Compute ledger</h2>", _html_table(["", ""], [list(r) for r in _rows_ledger(ledger)]),
                  "<p>Segments (one per start or restart):</p>",
                  _html_table(["#", "from step", "to step", "steps run", "lost", "model FLOPs", "device-h", "status"],
                              _segment_rows(ledger)),
                  "<h2>Regulatory thresholds</h2>",
                  _html_table(["name", "limit", "counts", "status", "this run", "what it asks"], _threshold_rows(ledger))]
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(records.config)}</pre>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
             "img{max-width:100%}figcaption{color:#555;font-size:.9rem}")
    html_path = run / "report.html"
    write_atomic(html_path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.name)}</title>"
                       f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return md_path, html_path
