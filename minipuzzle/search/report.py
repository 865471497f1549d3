"""Plots for the prune report: the candidates (budget used vs measured KL) and what was cut."""

from __future__ import annotations

from pathlib import Path

from minipuzzle.arch import Layout
from minipuzzle.artifacts import PruneReport

# Imports inside functions here are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.


def write_plots(report: PruneReport, source: Layout, folder: Path) -> list[Path]:
    """candidates.png and cuts.png in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    rows = report.candidates
    use_mem = report.budget.get("memory") is not None
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r.memory / 2**30 if use_mem else r.params / 1e9 for r in rows]
    y = [r.kl_to_teacher for r in rows]
    sc = ax.scatter(x, y, c=[r.predicted_damage for r in rows], cmap="viridis")
    ax.scatter([x[0]], [y[0]], s=160, facecolors="none", edgecolors="red", label="chosen")
    fig.colorbar(sc, label="predicted damage")
    ax.set_xlabel("memory (GiB)" if use_mem else "parameters (B)")
    ax.set_ylabel("KL to parent (nats/token)")
    ax.set_title("candidates")
    ax.legend()
    fig.tight_layout()
    p1 = folder / "candidates.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    res = report.chosen.result
    labels, kept = [], []
    for kind, n in source.layer_counts().items():
        if n:
            labels.append(f"{kind} layers")
            kept.append(res.layers[kind] / n)
    for axis, w in res.widths.items():
        labels.append(axis)
        kept.append(w / report.source_widths[axis])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.barh(labels, [1] * len(kept), color="lightgray", label="source")
    ax.barh(labels, kept, color="tab:blue", label="kept")
    ax.set_xlabel("fraction kept")
    ax.set_title(f"{res.params / 1e9:.3f}B of {report.chosen.source.params / 1e9:.3f}B parameters")
    ax.legend(loc="lower right")
    fig.tight_layout()
    p2 = folder / "cuts.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]
