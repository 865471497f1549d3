"""PNG plots of a `Scores`: layer importance by index (coloured by kind) and unit importance per layer."""

from __future__ import annotations

from pathlib import Path

import torch

from minipuzzle.anatomy import AXES, KIND_NAMES, LAYER_AXES, WIDTH_AXES
from minipuzzle.score.scores import Scores

# Imports inside functions here are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.

KIND_COLOURS = {"M": "tab:blue", "*": "tab:red", "-": "tab:green", "E": "tab:purple"}


def plot_scores(scores: Scores, folder: str | Path) -> list[Path]:
    """Write depth.png and width.png (for the axes present) into `folder`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    if "depth" in scores:
        d = scores["depth"].float()
        fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(d) + 2), 3.5))
        colours = [KIND_COLOURS.get(ch, "gray") for ch in scores.pattern]
        ax.bar(range(len(d)), d.tolist(), color=colours)
        from matplotlib.patches import Patch

        handles = [Patch(color=KIND_COLOURS[ch], label=name) for ch, name in KIND_NAMES.items() if ch in scores.pattern]
        # Scores span orders of magnitude (the first layers dominate): a log axis keeps the rest readable.
        if bool((d > 0).all()) and float(d.max() / d.min()) > 100:
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(str(scores.meta.settings.depth_metric if scores.meta.settings else "depth score"))
        ax.set_title("layer importance (drop one layer)")
        ax.legend(handles=handles)
        fig.tight_layout()
        written.append(folder / "depth.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    panels = [(a, scores[a]) for a in LAYER_AXES if a in scores]
    panels += [(a, {0: scores[a]}) for a in WIDTH_AXES if AXES[a].kind is None and a in scores]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels) + 0.6), squeeze=False)
        for ax, (name, per) in zip(axes[:, 0], panels, strict=True):
            layers = sorted(per)
            grid = torch.stack([per[i].float() for i in layers])
            # each layer scaled to its own maximum: the plot shows which units matter within a layer
            grid = grid / grid.amax(1, keepdim=True).clamp_min(1e-30)
            ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
            ax.set_yticks(range(len(layers)), [str(i) for i in layers] if AXES[name].kind is not None else ["all"])
            ax.set_ylabel("layer")
            ax.set_title(f"{name} importance (scaled per layer; x = unit index)", fontsize=9)
        fig.tight_layout()
        written.append(folder / "width.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
