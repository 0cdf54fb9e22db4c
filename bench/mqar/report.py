#!/usr/bin/env python3
"""The MQAR sweep's summary: an accuracy table (markdown) and a plot, from the run records.

    python3 bench/mqar/report.py [RESULTS]      (default bench/mqar/results)

Reads RESULTS/runs/*.json (written by train.py), writes RESULTS/summary.md and
RESULTS/accuracy.png (the plot needs matplotlib; without it only the table is written).
"""
import glob
import json
import os
import sys

ORDER = {"dense": 0, "swa": 1, "dma": 2}
LABEL = {"dense": "dense (causal)", "swa": "sliding window (banded mask)", "dma": "DMA (dma_torch)"}


def load_runs(results):
    runs = []
    for path in sorted(glob.glob(os.path.join(results, "runs", "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    runs.sort(key=lambda r: (r["config"]["seq_len"], ORDER.get(r["config"]["attention"], 9)))
    return runs


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def status(r):
    """The run's status, with the number of steps it skipped as non-finite (train.py's replay)."""
    n = len(r.get("skipped_steps") or [])
    return r["status"] + (f" ({n} non-finite step{'s' if n > 1 else ''} skipped)" if n else "")


def table(runs):
    lines = ["| L | w | attention | steps | ms / step | test acc. % at L | far | "
             "test acc. % at 2L | far | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c, t, t2 = r["config"], r.get("test") or {}, r.get("test_2x") or {}
        ms = r.get("ms_per_step")
        lines.append(f"| {c['seq_len']} | {c['window']} | {LABEL.get(c['attention'], c['attention'])} | "
                     f"{r['steps_done']} / {c['steps']} | {'-' if ms is None else f'{ms:.2f}'} | "
                     f"{pct(t.get('all'))} | {pct(t.get('far'))} | {pct(t2.get('all'))} | "
                     f"{pct(t2.get('far'))} | {status(r)} |")
    return "\n".join(lines)


def environments(runs):
    seen, out = set(), []
    for r in runs:
        e = r.get("env", {})
        key = (e.get("device_name"), e.get("torch"), e.get("commit"), e.get("dirty"))
        if key in seen:
            continue
        seen.add(key)
        out.append(f"- {e.get('date', '?')}: {e.get('device_name', '?')}, torch {e.get('torch', '?')}"
                   f" (CUDA {e.get('cuda')}), Python {e.get('python', '?')}, commit "
                   f"{str(e.get('commit', '?'))[:12]}{' with local changes' if e.get('dirty') else ''}")
    return "\n".join(out)


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = sorted({r["config"]["seq_len"] for r in runs})

    def length_axis(ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_xlabel("training length L")
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("test", "test accuracy at the training length L"),
              ("test_2x", "test accuracy at 2L (extrapolation)"))
    for ax, (key, title) in zip(axes, panels):
        for att in ORDER:
            pts = [(r["config"]["seq_len"], r[key]["all"]) for r in runs
                   if r["config"]["attention"] == att and r.get(key)]
            far = [(r["config"]["seq_len"], r[key]["far"]) for r in runs
                   if r["config"]["attention"] == att and r.get(key) and r[key]["far"] is not None]
            if pts:
                line, = ax.plot(*zip(*pts), "o-", label=LABEL[att])
                if far:
                    ax.plot(*zip(*far), "x--", color=line.get_color(), alpha=0.7,
                            label=f"{att}: far queries")
        length_axis(ax)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=10)
    ax = axes[2]
    for att in ORDER:
        pts = [(r["config"]["seq_len"], r["ms_per_step"]) for r in runs
               if r["config"]["attention"] == att and r.get("ms_per_step")]
        if pts:
            ax.plot(*zip(*pts), "o-", label=LABEL[att])
    length_axis(ax)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ms per training step")
    ax.set_title("time per training step", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    env = runs[0].get("env", {}) if runs else {}
    fig.suptitle(f"MQAR, 2-layer model; {env.get('device_name', '')}, torch {env.get('torch', '')}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results):
    runs = load_runs(results)
    out = os.path.join(results, "summary.md")
    c = runs[0]["config"] if runs else {}
    c_dma = next((r["config"] for r in runs if r["config"]["attention"] == "dma"), {})
    text = ["# MQAR sweep", ""]
    if runs:
        text += [f"Task: {c['pairs']} key-value pairs at the start, {c['queries']} queries in the rest "
                 f"(place g after the pairs with probability ~ 1/(g+1), so about half are near their "
                 f"value and the others anywhere up to the end); keys {c['n_keys']}, values "
                 f"{c['n_values']}, filler {c['n_filler']} tokens. "
                 f"Model: {c['layers']} layers, d_model {c['d_model']}, {c['heads']} "
                 f"head{'s' if c['heads'] > 1 else ''}"
                 f"{', DMA form ' + c_dma['form'] if c_dma.get('form') else ''}; "
                 f"batches of {c['batch']} sequences, AdamW lr {c['lr']}, the same steps for every "
                 f"attention of a length (the table); "
                 f"{c['eval_sequences']} test sequences per length. 'far': queries whose value lies "
                 f"more than layers x (w - 1) = {c['layers'] * (c['window'] - 1)} positions back, out "
                 f"of reach of the stacked sliding windows (nearer ones they can answer).", ""]
    text += [table(runs), "", "Runs:", "", environments(runs), ""]
    with open(out, "w") as f:
        f.write("\n".join(text))
    if runs and not plot(runs, os.path.join(results, "accuracy.png")):
        print("report: no matplotlib here, so no accuracy.png; on a machine with it (Debian: "
              f"python3-matplotlib) run python3 bench/mqar/report.py {results}")
    return out


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    print(write_report(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "results")))
