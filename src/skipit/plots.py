"""Figures of an analysis: each measure against the decoder layer, one line per modality.

`measure_figures` returns them as matplotlib figures (the HTML report draws on them); `plot_analysis` saves one PNG
per measure beside analysis.json.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from skipit.result import AnalysisResult, Series, VarProfile, as_result

COLORS = {"vision": "tab:orange", "text": "tab:blue"}


def as_array(values) -> np.ndarray:
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


def plot_series(ax, layers, stat: Series | list | None, label: str, color: str | None = None) -> bool:
    """Plot mean (and its CI band when present); False when there is nothing (finite) to plot."""
    if stat is None:
        return False
    series = stat if isinstance(stat, Series) else Series(list(stat))
    mean = as_array(series.mean)
    if ax.get_yscale() == "log":  # zeros (an update that changes nothing) have no place on a log axis
        mean[mean <= 0] = np.nan
    if not np.isfinite(mean).any():
        return False
    ax.plot(layers, mean, marker="o", ms=3, label=label, color=color)
    if series.ci_low is not None and series.ci_high is not None:
        ax.fill_between(layers, as_array(series.ci_low), as_array(series.ci_high), alpha=0.2, color=color, lw=0)
    return True


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(title: str, ylabel: str, log: bool = False):
    fig, ax = pyplot().subplots(figsize=(6.4, 3.4), layout="constrained")
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
    pyplot().close(fig)
    return None


def _per_modality(result: AnalysisResult, title: str, ylabel: str, pick, log: bool = False):
    """One line per modality: pick(modality) -> Series, list or None (not measured)."""
    fig, ax = _figure(title, ylabel, log)
    drawn = False
    for modality in result.all_modalities:
        drawn |= plot_series(ax, result.layers, pick(modality), modality, COLORS.get(modality))
    return _done(fig, drawn)


def tail_delta(result: AnalysisResult, near: float = 0.01) -> float:
    """The measured tail threshold delta closest to `near`."""
    return min(as_result(result).tail_deltas, key=lambda d: abs(d - near))


def measure_figures(result: AnalysisResult, delta: float = 0.01) -> dict:
    """{name: figure} for every measure present in `result`, in a fixed order: geometric, proximal (at the measured
    delta closest to `delta`), informational, cka, ablation_kl, lipschitz, logit_lens (VAR: `var_figure`). The
    caller closes the figures (`matplotlib.pyplot.close`)."""
    result = as_result(result)
    delta = tail_delta(result, delta)
    figures = {
        "geometric": _per_modality(result, "Geometric: E[rho], rho = (1 - cos) / 2", "E[rho(X_j, X_j+1)]",
                                   lambda m: result.measure("rho", m), log=True),
        "proximal": _per_modality(result, f"Proximal redundancy: P(rho > {delta:g})", "tail probability",
                                  lambda m: result.tail(m, delta)),
        "informational": _per_modality(result, "Informational: H(X_j+1 | X_j) / H(X_j+1)",
                                       "normalised conditional entropy", lambda m: result.measure("informational", m)),
        "cka": _per_modality(result, "Linear CKA(X_j, X_j+1) (debiased)", "CKA", lambda m: result.measure("cka", m)),
        "ablation_kl": _per_modality(result, "Ablation: KL(P_full || P_without j's update for m)", "KL (nats)",
                                     lambda m: result.ablation(m, "kl"), log=True),
    }  # fmt: skip
    layers = result.layers
    if result.ablated_modalities:
        fig, ax = _figure("Ablation gap E[TV] (solid), bound K_q0.9 E||update|| (dashed)", "TV", log=True)
        drawn = False
        for m in result.ablated_modalities:
            if plot_series(ax, layers, result.ablation(m, "tv"), f"{m} gap", COLORS.get(m)):
                drawn = True
                bound = as_array(result.lipschitz_bound(m, "q0.9") or [None] * len(layers))
                bound[bound <= 0] = np.nan
                ax.plot(layers, bound, ls="--", color=COLORS.get(m), label=f"{m} bound (K at q0.9)")
        figures["lipschitz"] = _done(fig, drawn)
    fig, ax = _figure("Logit lens at the answer: KL(P(X_j+1) || P(X_j))", "KL (nats)", log=True)
    figures["logit_lens"] = _done(fig, plot_series(ax, layers, result.logit_lens("kl"), "answer position (text)",
                                             COLORS["text"]))  # fmt: skip
    return {name: fig for name, fig in figures.items() if fig is not None}


def var_figure(result: AnalysisResult):
    """VAR and VAR normalised by the vision share of the keys (twin axis), or None for a text-only model."""
    result = as_result(result)
    var: VarProfile | None = result.var
    if var is None:
        return None
    fig, ax = _figure("VAR: attention of text queries on vision keys", "share of attention")
    drawn = plot_series(ax, result.layers, var.share, "VAR", "tab:purple")
    if drawn and var.normalised is not None:
        ax2 = ax.twinx()
        ax2.plot(result.layers, as_array(var.normalised.mean), ls="--", color="tab:gray", label="normalised")
        ax2.axhline(1.0, color="tab:gray", lw=0.5)
        ax2.set_ylabel("VAR / vision share of keys (dashed)")
    return _done(fig, drawn, loc="upper right")


def plot_analysis(result: AnalysisResult, out_dir: str | Path) -> list[Path]:
    """Write the PNGs of every measure present in `result` to out_dir."""
    plt = pyplot()
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
