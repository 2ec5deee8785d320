"""Figures of an analysis: each measure against the decoder layer, one line per modality.

`measure_figures` returns them as matplotlib figures (the HTML report draws on them); `plot_analysis` saves one PNG
per measure beside analysis.json.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

COLORS = {"vision": "tab:orange", "text": "tab:blue"}


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _save(fig, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a plot is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _line(ax, layers, stat: dict, label: str, color: str | None = None) -> bool:
    """Plot mean (and its CI band when present); False when there is nothing finite to plot."""
    mean = _arr(stat["mean"] if isinstance(stat, dict) else stat)
    if ax.get_yscale() == "log":  # zeros (an update that changes nothing) have no place on a log axis
        mean[mean <= 0] = np.nan
    if not np.isfinite(mean).any():
        return False
    ax.plot(layers, mean, marker="o", ms=3, label=label, color=color)
    if isinstance(stat, dict) and "ci_low" in stat:
        ax.fill_between(layers, _arr(stat["ci_low"]), _arr(stat["ci_high"]), alpha=0.2, color=color, lw=0)
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(title: str, ylabel: str, log: bool = False):
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.4), layout="constrained")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("decoder layer j (maps X_j to X_j+1)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return fig, ax


def _done(fig, drawn: bool, **legend):
    """The figure with its legend when something was drawn; otherwise None (and the figure is closed)."""
    if drawn:
        fig.axes[0].legend(fontsize=8, **legend)
        return fig
    _pyplot().close(fig)
    return None


def _per_modality(result: dict, title: str, ylabel: str, pick, log: bool = False):
    fig, ax = _figure(title, ylabel, log)
    drawn = False
    for modality, entry in result["measures"]["hidden"]["modalities"].items():
        stat = pick(entry, modality)
        drawn |= stat is not None and _line(ax, result["layers"], stat, modality, COLORS.get(modality))
    return _done(fig, drawn)


def tail_delta(result: dict, near: float = 0.01) -> float:
    """The measured tail threshold delta closest to `near`."""
    return min(result["settings"]["measure_config"]["tail_deltas"], key=lambda d: abs(d - near))


def measure_figures(result: dict, delta: float = 0.01) -> dict:
    """{name: figure} for every measure present in `result` (analysis.json content), in a fixed order:
    geometric, proximal (at the measured delta closest to `delta`), informational, cka, ablation_kl, lipschitz,
    logit_lens (VAR: `var_figure`). The caller closes the figures (`matplotlib.pyplot.close`)."""
    delta = tail_delta(result, delta)
    functional = result["measures"]["functional"]
    ablation = functional.get("ablation") or {}
    figures = {
        "geometric": _per_modality(result, "Geometric: E[rho], rho = (1 - cos) / 2", "E[rho(X_j, X_j+1)]",
                                   lambda e, m: e["geometric"]["rho"], log=True),
        "proximal": _per_modality(result, f"Proximal redundancy: P(rho > {delta:g})", "tail probability",
                                  lambda e, m: e["proximal"]["tail"][str(delta)]),
        "informational": _per_modality(
            result, "Informational: H(X_j+1 | X_j) / H(X_j+1)", "normalised conditional entropy",
            lambda e, m: e.get("informational", {}).get("score") and {
                "mean": e["informational"]["score"], "ci_low": e["informational"]["ci_low"],
                "ci_high": e["informational"]["ci_high"]}),
        "cka": _per_modality(result, "Linear CKA(X_j, X_j+1) (debiased)", "CKA",
                             lambda e, m: e.get("cka", {}).get("value")),
        "ablation_kl": _per_modality(result, "Ablation: KL(P_full || P_without j's update for m)", "KL (nats)",
                                     lambda e, m: ablation.get(m, {}).get("kl"), log=True),
    }  # fmt: skip
    layers = result["layers"]
    if ablation:
        fig, ax = _figure("Ablation gap E[TV] (solid), bound K_q0.9 E||update|| (dashed)", "TV", log=True)
        drawn = False
        for m, entry in ablation.items():
            if _line(ax, layers, entry["tv"], f"{m} gap", COLORS.get(m)):
                drawn = True
                bound = _arr(entry["lipschitz"]["q0.9"]["bound"])
                bound[bound <= 0] = np.nan
                ax.plot(layers, bound, ls="--", color=COLORS.get(m), label=f"{m} bound (K at q0.9)")
        figures["lipschitz"] = _done(fig, drawn)
    fig, ax = _figure("Logit lens at the answer: KL(P(X_j+1) || P(X_j))", "KL (nats)", log=True)
    figures["logit_lens"] = _done(fig, _line(ax, layers, functional["logit_lens"]["kl"], "answer position (text)",
                                             COLORS["text"]))  # fmt: skip
    return {name: fig for name, fig in figures.items() if fig is not None}


def var_figure(result: dict):
    """VAR and VAR normalised by the vision share of the keys (twin axis), or None for a text-only model."""
    var = result["measures"].get("var")
    if var is None:
        return None
    fig, ax = _figure("VAR: attention of text queries on vision keys", "share of attention")
    drawn = _line(ax, result["layers"], var["var"], "VAR", "tab:purple")
    if drawn:
        ax2 = ax.twinx()
        ax2.plot(result["layers"], _arr(var["var_normalised"]["mean"]), ls="--", color="tab:gray", label="normalised")
        ax2.axhline(1.0, color="tab:gray", lw=0.5)
        ax2.set_ylabel("VAR / vision share of keys (dashed)")
    return _done(fig, drawn, loc="upper right")


def plot_analysis(result: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNGs of every measure present in `result` (analysis.json content) to out_dir."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = measure_figures(result)
    if (var := var_figure(result)) is not None:
        figures["var"] = var
    paths = []
    try:
        for name, fig in figures.items():
            paths.append(_save(fig, out / f"{name}.png"))
    finally:
        for fig in figures.values():
            plt.close(fig)
    return paths
