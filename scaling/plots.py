"""The report's figures, each a function of an Analysis (and the Study, for loss curves) -> Figure.

Batch sizes and learning rates go on log axes (they are swept geometrically); every axis
names its unit. The functions never save or show: `save_figures` writes PNGs, a notebook
displays the returned figures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state and no GUI backend, headless or in a notebook
from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

from scaling.analysis import LR, USABLE, Analysis, Study

FIGURES = ("lr_heatmap", "cost_to_target", "best_lr", "loss_curves", "memory_pareto")
_INT = FuncFormatter(lambda v, _: f"{v:g}")


class _PlainLog(LogFormatter):
    """Log-axis labels as plain numbers (20, 5,000), not 2x10^1 or 5e+03."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:,.0f}" if x >= 1 else f"{x:.2g}"


def _batch_axis(ax, batch_sizes) -> None:
    """Log2 batch-size axis with a tick at every measured batch size."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(batch_sizes)))
    ax.xaxis.set_major_formatter(_INT)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size B (samples per step)")


def _span(values, pad: float = 1.6) -> np.ndarray:
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float)
    return np.geomspace(v.min() / pad, v.max() * pad, 200) if v.size else np.geomspace(1, 2, 2)


def reference_point(trials) -> Optional[tuple[float, float]]:
    """Return (ref_batch_size, ref_lr) the rules scale from, or None when not recorded as numbers."""
    try:
        return float(trials["scaling.ref_batch_size"].mode()[0]), float(trials["lr.base"].mode()[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def lr_heatmap(a: Analysis) -> Figure:
    """Best val/loss over (batch size, effective LR), the linear and sqrt rule lines, the divergence ceiling."""
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    g = a.grid
    ok = g[np.isfinite(g["value"])]
    sc = ax.scatter(ok["batch_size"], ok[LR], c=ok["value"], cmap="viridis_r", marker="s", s=520, edgecolors="white",
                    zorder=2)
    fig.colorbar(sc, ax=ax, label="best val/loss (seed median; lower is better)")
    per_column = int(ok.groupby("batch_size").size().max()) if len(ok) else 0
    if len(ok) <= 120:
        lo, hi = np.nanmin(ok["value"]), np.nanmax(ok["value"])
        size = 7 if per_column <= 12 else 6
        for b, lr, v in zip(ok["batch_size"], ok[LR], ok["value"]):
            dark = (v - lo) / max(hi - lo, 1e-12) > 0.55  # viridis_r is dark at high values
            ax.annotate(f"{v:.2f}", (b, lr), ha="center", va="center", fontsize=size, color="white" if dark else "black",
                        zorder=3)
    bad = g[~np.isfinite(g["value"])]
    if len(bad):
        ax.scatter(bad["batch_size"], bad[LR], marker="X", s=140, color="crimson", label="diverged", zorder=3)
    ax.scatter(a.best["batch_size"], a.best["lr_grid"], marker="o", s=900, facecolors="none", edgecolors="black",
               linewidths=1.5, label="best LR per batch size", zorder=4)
    bs = _span(g["batch_size"], 1.4)
    ref = reference_point(a.trials)
    if ref:
        for rule, alpha, style in (("linear", 1.0, "--"), ("sqrt", 0.5, ":")):
            ax.plot(bs, ref[1] * (bs / ref[0]) ** alpha, style, color="dimgray", zorder=1,
                    label=f"{rule} rule from B={ref[0]:g}, lr={ref[1]:g}")
    ceiling = a.divergence.dropna(subset=["diverges_at"])
    if len(ceiling):
        ax.plot(ceiling["batch_size"], ceiling["diverges_at"], "-", marker="_", ms=30, mew=3, color="crimson", lw=1.5,
                zorder=1, label="divergence ceiling (smallest diverging LR)")
    _batch_axis(ax, g["batch_size"])
    ax.set_yscale("log")
    ax.set_ylim(g[LR].min() / 2, g[LR].max() * 2)
    ax.set_ylabel("effective learning rate")
    ax.set_title("Best val/loss over the batch size x learning rate grid")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, markerscale=0.5)
    return fig


def cost_to_target(a: Analysis) -> Figure:
    """Steps and samples to target against batch size (log-log), the fitted curves, perfect scaling, B_crit."""
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    c = a.costs[a.costs["reached"]]
    fit = a.crit_fit
    bs = _span(a.costs["batch_size"])
    for ax, col, label in ((axes[0], "steps_to_target", "optimizer steps to target"),
                           (axes[1], "samples_to_target", "samples to target")):
        ax.plot(c["batch_size"], c[col], "o", color="tab:blue", ms=8, label="measured (best LR, seed median)", zorder=3)
        if len(c):
            b0, y0 = c["batch_size"].iloc[0], c[col].iloc[0]
            perfect = y0 * b0 / bs if col == "steps_to_target" else np.full_like(bs, y0)
            ax.plot(bs, perfect, ":", color="gray", label=f"perfect scaling from B={b0:g}")
        if fit is not None:
            curve = fit.steps(bs) * (1 if col == "steps_to_target" else bs)
            name = "S = S_min (1 + B_crit/B)" if col == "steps_to_target" else "E = E_min (1 + B/B_crit)"
            ax.plot(bs, curve, "-", color="tab:orange", label=f"fit {name}")
            ax.axvline(fit.b_crit, color="tab:red", ls="--", label=f"B_crit = {fit.b_crit:.3g}")
            lo, hi = fit.b_crit_interval
            if hi > lo:
                ax.axvspan(max(lo, bs[0]), min(hi, bs[-1]), color="tab:red", alpha=0.08, label="B_crit 95% interval")
        else:
            ax.text(0.98, 0.02, "no fit: needs 3 batch sizes that reach the target", transform=ax.transAxes,
                    ha="right", fontsize=8, color="dimgray")
        missed = a.costs.loc[~a.costs["reached"], "batch_size"]
        if len(missed):
            ax.text(0.02, 0.02, "not reached: B=" + ", ".join(f"{b:g}" for b in missed), transform=ax.transAxes,
                    fontsize=8, color="crimson")
        _batch_axis(ax, a.costs["batch_size"])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PlainLog(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Cost to reach {a.target} ({a.target.source} target)")
    return fig


def best_lr(a: Analysis) -> Figure:
    """Best effective LR against batch size, the fitted power law, and linear / sqrt reference lines."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    g, b = a.grid, a.best.dropna(subset=["lr_refined"])
    ax.scatter(g["batch_size"], g[LR], s=18, color="lightgray", label="LRs tried", zorder=1)
    ax.plot(b["batch_size"], b["lr_refined"], "o", color="tab:blue", ms=9, label="best LR (refined in log LR)", zorder=3)
    edge = b[b["edge"] != ""]
    if len(edge):
        ax.plot(edge["batch_size"], edge["lr_refined"], "o", ms=15, mfc="none", mec="tab:orange", mew=1.5,
                label="at the grid's edge (a bound)", zorder=3)
    bs = _span(g["batch_size"], 1.4)
    if len(b):
        b0, lr0 = b["batch_size"].iloc[0], b["lr_refined"].iloc[0]
        ax.plot(bs, lr0 * bs / b0, "--", color="dimgray", label=f"linear (alpha=1) from B={b0:g}")
        ax.plot(bs, lr0 * np.sqrt(bs / b0), ":", color="dimgray", label=f"sqrt (alpha=0.5) from B={b0:g}")
    f = a.lr_fit
    if f is not None:
        lo, hi = f.alpha_interval
        ax.plot(bs, f.c * bs ** f.alpha, "-", color="tab:blue",
                label=f"fit alpha = {f.alpha:.2f} [{lo:.2f}, {hi:.2f}] -> {f.verdict}")
    ceiling = a.divergence.dropna(subset=["diverges_at"])
    if len(ceiling):
        ax.plot(ceiling["batch_size"], ceiling["diverges_at"], "v", color="crimson", ms=9, label="smallest diverging LR")
    _batch_axis(ax, g["batch_size"])
    ax.set_yscale("log")
    ax.set_ylabel("effective learning rate")
    ax.set_title("Best learning rate vs batch size")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def loss_curves(a: Analysis, study: Study) -> Figure:
    """Validation and training loss against samples seen, one panel per batch size, at its best LR."""
    best = a.trials.merge(a.best[["batch_size", "lr_grid"]], on="batch_size")
    best = best[np.isclose(best[LR], best["lr_grid"]) & best["status"].isin(USABLE)]
    best = best.sort_values("best/val_loss").drop_duplicates("batch_size").sort_values("batch_size")
    n = max(len(best), 1)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False)
    val, train = study.history("val/loss", best["trial"]), study.history("train/loss", best["trial"])
    for ax, (_, t) in zip(axes.flat, best.iterrows()):
        for h, style, label in ((train, "--", "train/loss"), (val, "-", "val/loss")):
            h = h[h["trial"] == t["trial"]].sort_values("samples")
            ax.plot(h["samples"], h["value"], style, marker="." if style == "-" else None, label=label)
        hit = t.get("samples_to_target", np.inf)
        if np.isfinite(hit):
            ax.axvline(hit, color="tab:green", ls=":", label=f"reached {a.target.metric} target")
        if a.target.metric in ("val/loss", "train/loss"):
            ax.axhline(a.target.value, color="tab:green", lw=0.8, ls="-.", label=f"target {a.target}")
        ax.set_title(f"B={t['batch_size']:g}, lr={t[LR]:.3g} ({t['status']})", fontsize=10)
        ax.set_xlabel("samples seen")
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(best):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("cross-entropy loss (nats)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Loss curves at each batch size's best learning rate")
    return fig


def memory_pareto(a: Analysis, budget_mb: Optional[float] = None) -> Figure:
    """Peak memory against time to target per (batch size, micro-batch, precision), with the Pareto frontier."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    m = a.memory[np.isfinite(a.memory["time_to_target_s"])]
    if m.empty:
        ax.text(0.5, 0.5, f"no configuration reached {a.target}", ha="center", transform=ax.transAxes)
        return fig
    front = m[m["on_frontier"]].sort_values("peak_mb")
    rest = m[~m["on_frontier"]]
    ax.scatter(rest["peak_mb"], rest["time_to_target_s"], s=60, color="tab:blue", label="dominated configuration", zorder=3)
    ax.scatter(front["peak_mb"], front["time_to_target_s"], s=70, color="tab:orange", edgecolors="black",
               label="on the Pareto frontier", zorder=3)
    ax.step(front["peak_mb"], front["time_to_target_s"], where="post", color="tab:orange", lw=2, zorder=2)
    for _, r in m.iterrows():
        label = f"B={r['batch_size']:g}"
        if "micro_batch_size" in r and r["micro_batch_size"] != r["batch_size"]:
            label += f" mb={r['micro_batch_size']:g}"
        if "precision" in r and m["precision"].nunique() > 1:
            label += f" {r['precision']}"
        ax.annotate(label, (r["peak_mb"], r["time_to_target_s"]), xytext=(9, 7), textcoords="offset points", fontsize=8)
    if budget_mb is not None:
        ax.axvline(budget_mb, color="crimson", ls="--", label=f"memory budget {budget_mb:g} MB")
        ax.axvspan(budget_mb, max(budget_mb, m["peak_mb"].max()) * 10, color="crimson", alpha=0.06)
    if a.recommendation is not None:
        r = a.recommendation
        ax.plot(r["peak_mb"], r["time_to_target_s"], "o", ms=18, mfc="none", mec="tab:green", mew=2,
                label="recommended", zorder=4)
    for axis, values in (("x", m["peak_mb"]), ("y", m["time_to_target_s"])):
        if values.min() > 0 and values.max() / values.min() > 10:
            getattr(ax, f"set_{axis}scale")("log")
    lo, hi = m["peak_mb"].min(), m["peak_mb"].max()
    if budget_mb is not None:
        lo, hi = min(lo, budget_mb), max(hi, budget_mb)
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_xlabel("peak memory (MB)")
    ax.set_ylabel("time to target (s)")
    ax.set_title(f"Memory vs time to reach {a.target}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def save_figures(a: Analysis, study: Study, out_dir: Path, budget_mb: Optional[float] = None) -> list[Path]:
    """Write every figure as a PNG in out_dir and return the paths (figures with no data are skipped)."""
    makers = {"lr_heatmap": lambda: lr_heatmap(a), "cost_to_target": lambda: cost_to_target(a),
              "best_lr": lambda: best_lr(a), "loss_curves": lambda: loss_curves(a, study),
              "memory_pareto": lambda: memory_pareto(a, budget_mb)}
    paths = []
    for name in FIGURES:
        fig = makers[name]()
        path = Path(out_dir) / f"{name}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths

