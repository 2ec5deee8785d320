"""One self-contained HTML page of a run folder (`skipit report RUN_DIR`).

RUN_DIR/analysis.json (required, from `skipit analyze`), RUN_DIR/plan.json (`skipit plan`) and RUN_DIR/sweep.json
(the plan sweep) become RUN_DIR/report.html: the per-layer measures of each modality with the plan's bands shaded,
the VAR profile, the plan, predicted against measured degradation, and the speed and baseline tables. Every figure
is inline SVG, the style sheet is inline and nothing is fetched: the page reads the same offline, mailed, or
archived. A section whose input is missing says so in one line instead.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from skipit.errors import SkipitError
from skipit.io import write_text
from skipit.plots import as_array, measure_figures, plot_series, pyplot, tail_delta
from skipit.result import AnalysisResult, VarProfile

REPORT = "report.html"
PROXIMAL_DELTA = 0.05
# The per-layer charts, in page order (ablation ones only exist with `skipit analyze --ablation`).
MEASURES = ("geometric", "proximal", "informational", "cka", "logit_lens", "ablation_kl", "lipschitz")
PREDICTED = ("geometric", "proximal", "informational", "cka", "var", "logit_lens")
FAMILIES = ("empty", "late_entry", "early_exit", "vision_frozen", "layer_skip", "skipit", "baseline")
FAMILY_COLORS = ("tab:gray", "tab:green", "tab:red", "tab:cyan", "tab:brown", "tab:purple", "tab:olive",
                 "tab:pink", "tab:blue", "tab:orange")  # fmt: skip
# What the plan does to a band of layers -> its shading in every per-layer chart.
BANDS = {
    "late entry (vision absent)": "#2ca02c",
    "late entry (vision frozen)": "#98df8a",
    "early exit (vision gone)": "#d62728",
    "skipped (all tokens)": "#7f7f7f",
    "frozen vision layer": "#17becf",
    "vision pruned (a share kept)": "#ff7f0e",
    "vision reduced before layer 0": "#ffbb78",
}
COST_LABELS = {"skip": "skip the layer (all tokens)", "freeze": "freeze vision tokens",
               "absent": "vision absent (late entry)", "exit": "vision gone (early exit)"}


@dataclass
class Run:
    """What a run folder holds; a missing or unreadable optional file leaves its note instead."""

    dir: Path
    analysis: AnalysisResult
    plan: object | None = None  # skipit.plan.Plan
    sweep: dict | None = None
    notes: dict = field(default_factory=dict)  # "plan" / "sweep" -> why it is not shown


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SkipitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise SkipitError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise SkipitError(f"{path} does not hold a JSON object")
    return data


def load_run(run_dir: str | Path) -> Run:
    """Read RUN_DIR; SkipitError without a readable analysis.json, notes for a missing plan or sweep."""
    from skipit.plan import Plan

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SkipitError(f"run folder {run_dir} does not exist: run skipit analyze --out {run_dir} first")
    path = run_dir / "analysis.json"
    if not path.is_file():
        raise SkipitError(f"no analysis.json in {run_dir}: run skipit analyze first")
    run = Run(run_dir, AnalysisResult.load(path))
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        run.notes["plan"] = "No plan.json in the run folder yet (skipit plan writes it): no bands, no plan table."
    else:
        try:
            run.plan = Plan.load(plan_path)
        except SkipitError as e:
            run.notes["plan"] = f"plan.json could not be read: {e}."
    sweep_path = run_dir / "sweep.json"
    if not sweep_path.is_file():
        run.notes["sweep"] = "No sweep.json in the run folder yet: run the plan sweep to fill this section."
    else:
        try:
            sweep = _read_json(sweep_path)
            if sweep.get("format") != "skipit-sweep":
                raise SkipitError('sweep.json is not a skipit sweep (expected "format": "skipit-sweep")')
            run.sweep = sweep
        except SkipitError as e:
            run.notes["sweep"] = f"sweep.json could not be read: {e}."
    return run


# ---------------------------------------------------------------------------------------------------- formatting


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def _f(x, spec: str = ".3g", suffix: str = "") -> str:
    v = _num(x)
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _pct(x) -> str:
    return _f(x, ".1%")


def _times(x) -> str:
    return _f(x, ".2f", "×")


def _layers(js) -> str:
    """[1, 2, 3, 7] -> '1–3, 7'."""
    js = sorted(js)
    if not js:
        return "none"
    runs, start = [], js[0]
    for a, b in zip(js, js[1:] + [None], strict=True):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}–{a}")
            start = b
    return ", ".join(runs)


def describe_plan(plan: dict | None) -> str:
    """One line for a plan dict (plan.json content): 'k=3 (absent), m=20, skip 5–6, frozen 9'."""
    if not isinstance(plan, dict):
        return "–"
    parts = []
    if plan.get("late_entry"):
        parts.append(f"k={plan['late_entry']} ({plan.get('late_entry_mode', 'absent')})")
    if plan.get("early_exit") is not None:
        parts.append(f"m={plan['early_exit']}")
    if plan.get("skip_layers"):
        parts.append(f"skip {_layers(plan['skip_layers'])}")
    if plan.get("frozen_vision_layers"):
        parts.append(f"frozen {_layers(plan['frozen_vision_layers'])}")
    if (g := plan.get("input_vision_keep")) is not None:
        parts.append(f"vision reduced to {g:.0%} before layer 0 (divprune)")
    if (p := plan.get("prune_vision_after")) is not None:
        rank = plan.get("prune_vision_rank", "attention")
        where = "before layer 0" if p == -1 else f"after {p}"
        parts.append(f"vision pruned to {plan.get('prune_vision_keep', 0.5):.0%} {where} ({rank})")
    return ", ".join(parts) or "no change"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(headers: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape with _e); no header row with headers=None."""
    head = "<thead><tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}">{head}<tbody>{body}</tbody></table></div>'


# ------------------------------------------------------------------------------------------------------- figures


class _Charts:
    """Matplotlib figures -> inline SVG: fonts as paths, no metadata, ids fixed (a constant salt) and unique."""

    def __init__(self):
        self.count = 0

    def svg(self, fig, caption: str = "") -> str:
        import matplotlib

        plt = pyplot()
        self.count += 1
        buf = io.StringIO()
        try:
            with matplotlib.rc_context({"svg.hashsalt": "skipit-report", "svg.fonttype": "path"}):
                fig.savefig(buf, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
        text = buf.getvalue()
        text = text[text.index("<svg"):]  # no XML declaration or DOCTYPE inside HTML
        text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # creation date, tool URLs
        # Every figure names its parts and font glyphs alike (figure_1, DejaVuSans-30): prefix them per chart so
        # the ids stay unique within the page and each chart only ever refers to its own definitions.
        prefix = f"c{self.count}-"
        text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', text)
        text = re.sub(r'\b((?:xlink:)?href)="#([^"]+)"', rf'\1="#{prefix}\2"', text)
        text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", text)
        caption = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f'<figure class="chart">{text}{caption}</figure>'


def plan_bands(plan, num_layers: int) -> dict[str, list[tuple[int, int]]]:
    """{band label: [(first, last) layer runs]} from the plan's per-layer roles (`Plan.roles`)."""
    from skipit.plan import ABSENT, FROZEN, PRUNED, SKIP

    bands: dict[str, list[tuple[int, int]]] = {}
    if plan is None or plan.num_layers != num_layers:
        return bands
    for j, role in enumerate(plan.roles()):
        if role == SKIP:
            label = "skipped (all tokens)"
        elif role in (ABSENT, FROZEN) and j < plan.late_entry:
            label = f"late entry (vision {role})"
        elif role == ABSENT:
            label = "early exit (vision gone)"
        elif role == FROZEN:
            label = "frozen vision layer"
        elif role == PRUNED:
            label = "vision pruned (a share kept)"
        elif plan.input_vision_keep is not None:  # a layer before the second stage: only the tokens that entered
            label = "vision reduced before layer 0"
        else:
            continue
        runs = bands.setdefault(label, [])
        if runs and runs[-1][1] == j - 1:
            runs[-1] = (runs[-1][0], j)
        else:
            runs.append((j, j))
    return bands


def _shade(fig, bands: dict, num_layers: int) -> None:
    """Shade the plan's bands behind every axes of `fig`; move the legend outside, bands included."""
    from matplotlib.patches import Patch

    for ax in fig.axes:
        for label, runs in bands.items():
            for a, b in runs:
                ax.axvspan(a - 0.5, b + 0.5, color=BANDS[label], alpha=0.22, lw=0, zorder=0)
        ax.set_xlim(-0.5, num_layers - 0.5)
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=BANDS[label], alpha=0.4) for label in bands]
    labels += list(bands)
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _var_figure(var: VarProfile, layers: list, ci: str):
    if var.normalised is None:
        raise ValueError("no var_normalised")
    fig, axes = pyplot().subplots(2, 1, figsize=(10.0, 5.2), sharex=True, layout="constrained")
    raw, norm = axes
    raw.set_title("VAR: share of the text queries' attention on vision keys", fontsize=10)
    plot_series(raw, layers, var.share, f"VAR ({ci} CI)", "tab:purple")
    if var.expected_share:
        raw.plot(layers, as_array(var.expected_share), ls=":", color="tab:gray", label="vision share of keys")
    raw.set_ylabel("share of attention")
    raw.legend(fontsize=7)
    plot_series(norm, layers, var.normalised, f"VAR / vision share of keys ({ci} CI)", "tab:purple")
    norm.axhline(1.0, color="tab:gray", lw=0.8, ls="--", label="uniform attention")
    norm.set_ylabel("normalised VAR")
    norm.set_xlabel("decoder layer j (maps X_j to X_j+1)")
    norm.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------------------------- sections


def _or(x, default: str):
    return default if x is None else x


def _header(run: Run) -> str:
    a = run.analysis
    model, data = a.model, a.data
    found = [name for name in ("analysis.json", "plan.json", "sweep.json") if (run.dir / name).is_file()]
    rows = [
        ["model", f"{_e(_or(model.path, '–'))} <span class='dim'>({_e(_or(model.class_name, '?'))}, "
                  f"{_e(_or(model.num_layers, a.num_layers))} decoder layers, fingerprint "
                  f"{_e(_or(model.fingerprint, '?'))})</span>"],
        ["calibration data", f"{_e(_or(data.path, '–'))} <span class='dim'>({_e(_or(data.n_records, '?'))} "
                             "records)</span>"],
        ["analysis created", _e(_or(a.created, "–"))],
        ["inputs found", _e(", ".join(found))],
    ]  # fmt: skip
    data = (run.sweep or {}).get("data")
    if isinstance(data, dict) and (data.get("path") or data.get("n")):
        n = f" <span class='dim'>({_e(data['n'])} records)</span>" if data.get("n") is not None else ""
        rows.append(["sweep data", _e(data.get("path") or "") + n])
    return _table(None, rows, "kv")


def _measures_section(run: Run, charts: _Charts) -> str:
    a = run.analysis
    L = a.num_layers
    bands = plan_bands(run.plan, L)
    parts = []
    if "plan" in run.notes:
        parts.append(_note(run.notes["plan"]))
    elif run.plan is not None and run.plan.num_layers != L:
        parts.append(_note(f"plan.json is for {run.plan.num_layers} layers, the analysis has {L}: bands not shown."))
    elif bands:
        swatches = "".join(f'<span class="swatch" style="background:{BANDS[b]}"></span>{_e(b)} '
                           for b in bands)  # fmt: skip
        parts.append(f'<p class="legend">Shaded: {swatches}</p>')
    else:
        parts.append(_note("The plan changes no layer: nothing is shaded."))
    try:
        delta = tail_delta(a, PROXIMAL_DELTA)
        if abs(delta - PROXIMAL_DELTA) > 1e-12:
            parts.append(_note(f"The analysis has no tail at delta {PROXIMAL_DELTA}; the proximal chart uses "
                               f"{delta:g}."))  # fmt: skip
        figures = measure_figures(a, PROXIMAL_DELTA)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return "".join(parts) + _note(f"analysis.json lacks what the per-layer charts need ({e!r}).")
    for name in MEASURES:
        if name in figures:
            fig = figures[name]
            fig.set_size_inches(10.0, 3.3)
            _shade(fig, bands, L)
            parts.append(charts.svg(fig))
    absent = [n for n in MEASURES[:5] if n not in figures]
    if absent:
        parts.append(_note(f"Not in this analysis: {', '.join(absent)}."))
    return "".join(parts)


def _var_section(run: Run, charts: _Charts) -> str:
    var = run.analysis.var
    if var is None:
        return _note("No VAR in this analysis (a text-only model has no vision keys).")
    L = run.analysis.num_layers
    level = run.analysis.ci_level
    ci = f"{level:.0%}" if level is not None else "bootstrap"
    try:
        fig = _var_figure(var, run.analysis.layers, ci)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return _note(f"The VAR entry of analysis.json is incomplete ({e!r}).")
    _shade(fig, plan_bands(run.plan, L), L)
    return charts.svg(fig, f"Text queries = the prompt's text tokens; {ci} bootstrap CI over examples.")


def _plan_section(run: Run) -> str:
    plan = run.plan
    if plan is None:
        return _note(run.notes.get("plan", "No plan."))
    parts = []
    fingerprint = run.analysis.model.fingerprint
    if fingerprint and fingerprint != plan.fingerprint:
        parts.append(_note(f"This plan was made for other weights (fingerprint {plan.fingerprint}, the analysis has "
                           f"{fingerprint})."))  # fmt: skip
    L, k, m = plan.num_layers, plan.late_entry, plan.early_exit
    decisions = [
        ["late entry", f"k = {k}" + (f": vision tokens {plan.late_entry_mode} in layers {_layers(range(k))}"
                                    if k else " (none)")],
        ["early exit", "none (vision tokens stay to the last layer)" if m is None
         else f"m = {m}: vision tokens leave after layer {m} (gone from layers {_layers(range(m + 1, L))})"],
        ["skipped layers (all tokens)", _layers(plan.skip_layers)],
        ["frozen vision layers", _layers(plan.frozen_vision_layers)],
        ["layers that update vision tokens", _layers([j for j, r in enumerate(plan.roles()) if r == "all"])],
        ["made for", f"{plan.architecture}, {L} layers, fingerprint {plan.fingerprint}"],
    ]  # fmt: skip
    parts.append("<h3>Decisions</h3>" + _table(["decision", "layers"], [[_e(a), _e(b)] for a, b in decisions], "kv"))
    ev = plan.evidence if isinstance(plan.evidence, dict) else {}
    if not ev:
        parts.append(_note("The plan carries no evidence (thresholds, predicted saving): it was written by hand."))
        return "".join(parts)
    if ev.get("method"):
        parts.append(f"<p>Method: {_e(ev['method'])}.</p>")
    th = ev.get("thresholds") or {}
    if th:
        rows = [[_e(key), _f(value, ".4g")] for key, value in th.items()]
        if _num(ev.get("threshold_scale")) is not None:
            rows.append(["scale (applied to epsilon, eta, tau)", _f(ev["threshold_scale"], ".4g")])
        parts.append("<h3>Thresholds</h3>" + _table(["threshold", "value"], rows, "kv"))
    pred = ev.get("predicted") or {}
    if pred:
        labels = {"flops_removed": ("FLOPs removed (prefill)", _pct),
                  "decode_flops_removed": ("FLOPs removed per decode step", _pct),
                  "prefill": ("ideal prefill speed-up", _times),
                  "decode": ("ideal decode speed-up", _times), "kv_memory": ("KV-cache size (vs untouched)", _pct)}
        rows = [[_e(labels.get(key, (key,))[0]), labels.get(key, (key, _f))[1](value)] for key, value in pred.items()]
        prompt = ev.get("prompt") or {}
        cap = (f" on the mean calibration prompt ({_e(prompt.get('vision_tokens', '?'))} vision + "
               f"{_e(prompt.get('text_tokens', '?'))} text tokens)") if prompt else ""  # fmt: skip
        parts.append(f"<h3>Predicted saving{cap}</h3>" + _table(["quantity", "predicted"], rows, "kv"))
    reasons = ev.get("reasons") or {}
    if reasons:
        parts.append("<h3>Why these thresholds</h3><ul>" + "".join(f"<li><b>{_e(key)}</b>: {_e(value)}</li>"
                                                                  for key, value in reasons.items()) + "</ul>")
    costs = ev.get("costs") or {}
    if costs and all(isinstance(v, list) for v in costs.values()):
        n = max(len(v) for v in costs.values())
        rows = []
        for name, values in costs.items():
            name = COST_LABELS.get(name, name)
            cells = []
            for c in values:
                v = _num(c)
                cls = "ok" if v is not None and v < 1 else ""
                cells.append(f'<span class="{cls}">{_f(c, ".2g") if v is not None else "∞"}</span>')
            rows.append([_e(name)] + cells)
        parts.append("<h3>Per-layer cost of each decision</h3>"
                     "<p class='dim'>Allowed where below 1 (highlighted): max(rho / epsilon, P / eta, VAR / tau) "
                     "over the conditions the decision needs.</p>"
                     + _table(["decision"] + [str(j) for j in range(n)], rows, "costs"))  # fmt: skip
    return "".join(parts)


def _family_colors(plans: list[dict]) -> dict[str, str]:
    """A fixed colour per known family (the same in every report, matching the bands), then the others'."""
    present = {str(p.get("family")) for p in plans}
    colors = {f: FAMILY_COLORS[i] for i, f in enumerate(FAMILIES) if f in present}
    spare = FAMILY_COLORS[len(FAMILIES):]
    colors.update({f: spare[i % len(spare)] for i, f in enumerate(sorted(present - set(FAMILIES)))})
    return colors


def _scatter_figure(plans: list[dict], measures: list[str], correlation: dict, lost: set):
    from matplotlib.lines import Line2D

    plt = pyplot()
    cols = min(3, len(measures))
    rows = math.ceil(len(measures) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.6, 2.9 * rows), sharey=True, squeeze=False,
                             layout="constrained")  # fmt: skip
    colors = _family_colors(plans)
    for ax, measure in zip(axes.flat, measures, strict=False):
        groups: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for p in plans:
            x, y = _num((p.get("predicted") or {}).get(measure)), _num(p.get("accuracy_drop"))
            if x is None or y is None:
                continue
            groups.setdefault((str(p.get("family")), p.get("safe") is True), []).append((x, y))
            if p.get("name") in lost:
                ax.scatter([x], [y], s=70, marker="x", color="tab:red", linewidths=1.4, zorder=4)
                ax.annotate(str(p["name"]), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=6,
                            color="tab:red")  # fmt: skip
        for (family, safe), points in groups.items():
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, s=34 if safe else 22, color=colors[family], alpha=0.85,
                       edgecolors="black" if safe else "none", linewidths=1.2, zorder=3)  # fmt: skip
        ax.axhline(0, color="gray", lw=0.6)
        c = correlation.get(measure) or {}
        title = measure
        if _num(c.get("spearman")) is not None:
            title += f"\nSpearman {c['spearman']:.2f} [{_f(c.get('ci_low'), '.2f')}, {_f(c.get('ci_high'), '.2f')}]"
            title += f", n={c.get('n', '?')}"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"predicted degradation ({measure})", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(measures):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy drop (points)", fontsize=8)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=f) for f, c in colors.items()]
    handles.append(Line2D([], [], ls="", marker="o", color="white", markeredgecolor="black", label="predicted safe"))
    if lost:
        handles.append(Line2D([], [], ls="", marker="x", color="tab:red", label="safe but lost accuracy"))
    fig.legend(handles=handles, fontsize=7, loc="outside right upper")
    return fig


def _sweep_plans(run: Run) -> list[dict]:
    plans = (run.sweep or {}).get("plans")
    return [p for p in plans if isinstance(p, dict)] if isinstance(plans, list) else []


def _scatter_section(run: Run, charts: _Charts) -> str:
    if run.sweep is None:
        return _note(run.notes.get("sweep", "No sweep."))
    plans = _sweep_plans(run)
    if not plans:
        return _note("sweep.json holds no plans yet.")
    present = {k for p in plans for k, v in (p.get("predicted") or {}).items() if _num(v) is not None}
    measures = [m for m in PREDICTED if m in present] + sorted(present - set(PREDICTED))
    if not measures or not any(_num(p.get("accuracy_drop")) is not None for p in plans):
        return _note("The sweep's plans carry no predicted degradation or no measured accuracy drop to compare.")
    correlation = run.sweep.get("correlation") or {}
    lost = set(run.sweep.get("safe_but_lost") or [])
    parts = [charts.svg(_scatter_figure(plans, measures, correlation, lost),
                        "One point per plan of the sweep; x: the degradation each measure predicts, y: the measured "
                        "accuracy drop (reference minus plan, in points).")]  # fmt: skip
    if correlation:
        rows = [[_e(m), _f(c.get("spearman"), ".3f"), f"[{_f(c.get('ci_low'), '.3f')}, {_f(c.get('ci_high'), '.3f')}]",
                 _e(c.get("n", "–"))] for m, c in correlation.items() if isinstance(c, dict)]  # fmt: skip
        parts.append("<h3>Rank correlation of predicted degradation with accuracy drop</h3>"
                     + _table(["measure", "Spearman", "CI", "plans"], rows))  # fmt: skip
    by_family = run.sweep.get("correlation_by_family") or {}
    if by_family and isinstance(by_family, dict):
        ms = [m for m in measures if any(m in (c or {}) for c in by_family.values())]
        rows = [[_e(f)] + [_f((c.get(m) or {}).get("spearman"), ".2f") for m in ms]
                for f, c in by_family.items() if isinstance(c, dict)]  # fmt: skip
        parts.append("<h3>Spearman within each family</h3>" + _table(["family"] + [_e(m) for m in ms], rows))
    if lost:
        more = f" (more than {_f(run.sweep['lost_points'], 'g')} points)" if _num(run.sweep.get("lost_points")) else ""
        parts.append(f'<p class="warn">Predicted safe but lost accuracy{more}: {_e(", ".join(sorted(lost)))}.</p>')
        if "safe_but_lost_significant" in run.sweep:
            real = sorted(run.sweep["safe_but_lost_significant"] or [])
            parts.append(f"<p>Of those, significant by McNemar's exact test (p &lt; 0.05): "
                         f"{_e(', '.join(real)) if real else 'none: every such loss may be chance'}.</p>")
    elif "safe_but_lost" in run.sweep:
        parts.append("<p>No plan predicted safe lost accuracy.</p>")
    return "".join(parts)


def _with_ci(value, ci, spec: str = ".3f", scale: float = 1.0) -> str:
    """A figure with its interval, "0.630 [0.601, 0.662]" (just the figure when the file has no interval)."""
    text = _f(None if _num(value) is None else scale * value, spec)
    if not isinstance(ci, dict) or _num(ci.get("low")) is None or _num(ci.get("high")) is None:
        return text
    return f"{text} <span class='dim'>[{scale * ci['low']:{spec}}, {scale * ci['high']:{spec}}]</span>"


def _measured(p: dict, kind: str) -> str:
    """A measured speed-up, or a flag where `skipit.evaluation.speed.noise` says it is not a result."""
    if p.get("timed") is False:  # scored for accuracy only (a sweep times the plans its comparisons need)
        return '<span class="dim">not timed</span>'
    reasons = [r for r in p.get("speed_noisy") or [] if kind in r]
    if reasons:
        return f'<span class="lost" title="{_e("; ".join(reasons))}">noisy</span>'
    return _times(p.get(f"{kind}_speedup"))


def _speed_section(run: Run) -> str:
    if run.sweep is None:
        return _note(run.notes.get("sweep", "No sweep."))
    plans = _sweep_plans(run)
    if not plans:
        return _note("sweep.json holds no plans yet.")
    ref = run.sweep.get("reference") or {}
    parts = []
    known = [("accuracy", "accuracy {}", ".3f", ""), ("prefill_s", "prefill {}", ".1f", " ms"),
             ("decode_tokens_per_s", "decode {}", ".1f", " tokens/s")]  # fmt: skip
    said = [label.format(_f(1e3 * ref[key] if key == "prefill_s" else ref[key], spec, unit))
            for key, label, spec, unit in known if _num(ref.get(key)) is not None]  # fmt: skip
    if said:
        parts.append(f"<p>Reference (no plan): {', '.join(said)}.</p>")
    headers = ["plan", "family", "decisions", "safe", "FLOPs saved", "ideal prefill", "prefill", "ideal decode",
               "decode", "KV memory", "accuracy", "drop (points)"]  # fmt: skip
    lost = set(run.sweep.get("safe_but_lost") or [])
    rows = []
    for p in plans:
        safe = p.get("safe")
        safe = "yes" if safe is True else "no" if safe is False else "–"
        if p.get("name") in lost:
            safe = f'<span class="lost">{safe}: lost accuracy</span>'
        rows.append([
            _e(p.get("name", "?")), _e(p.get("family", "?")), _e(describe_plan(p.get("plan"))), safe,
            _pct(p.get("flops_removed")),
            _times(p.get("ideal_prefill_speedup")), _measured(p, "prefill"),
            _times(p.get("ideal_decode_speedup")), _measured(p, "decode"),
            _pct(p.get("kv_memory")), _with_ci(p.get("accuracy"), p.get("accuracy_ci")),
            _with_ci(p.get("accuracy_drop"), p.get("drop_ci"), "+.1f"),
        ])  # fmt: skip
    parts.append(_table(headers, rows, "num"))
    parts.append("<p class='dim'>Speed-ups are untouched / plan (ideal: from FLOPs), medians of rounds run side by "
                 "side; <em>noisy</em> marks one whose rounds disagree, that beats its ideal by more than 15 %, or "
                 "whose run's empty-plan control strayed from x1.00 (hover for why): it is not a result. KV memory is "
                 "the plan's KV cache as a share of the untouched one. Accuracy and drop carry 95 % paired bootstrap "
                 "intervals over the same questions as the reference.</p>")
    return "".join(parts)


def _pareto_figure(baselines: list[dict], kept: str = "accuracy_kept", ylabel: str = "accuracy kept (%)"):
    """Row[`kept`] (accuracy kept, or CIDEr-D kept), with its paired 95 % interval (row[`kept` + "_ci"]), against
    FLOPs removed: one line per method over its budgets."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.6), layout="constrained")
    methods = sorted({str(b.get("method")) for b in baselines}, key=lambda m: (not m.startswith("skipit"), m))
    cmap = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        rows = [b for b in baselines if str(b.get("method")) == method
                and _num(b.get(kept)) is not None and _num(b.get("flops_removed")) is not None]
        points = sorted(((100 * b["flops_removed"], 100 * b[kept], b.get(kept + "_ci") or {})
                         for b in rows), key=lambda p: p[0])  # fmt: skip
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        # a bootstrap interval of a ratio need not hold its point estimate: clip the bars at the point
        lows = [max(0.0, y - 100 * c["low"]) if _num(c.get("low")) is not None else 0 for (_, y, c) in points]
        highs = [max(0.0, 100 * c["high"] - y) if _num(c.get("high")) is not None else 0 for (_, y, c) in points]
        mine = method.startswith("skipit")
        ax.errorbar(xs, ys, yerr=[lows, highs], marker="o" if mine else ".", ms=6 if mine else 5, capsize=2,
                    lw=2.0 if mine else 1.0, color="black" if method == "skipit" else cmap(i % 10), label=method,
                    alpha=0.9, ls="-" if len(points) > 1 else "none")  # fmt: skip
    ax.axhline(100, color="gray", lw=0.6)
    ax.axhline(99, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("prefill FLOPs removed (%)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right upper")
    return fig


def _baselines_section(run: Run, charts: _Charts | None = None) -> str:
    if run.sweep is None:
        return _note(run.notes.get("sweep", "No sweep."))
    baselines = [b for b in run.sweep.get("baselines") or [] if isinstance(b, dict)]
    if not baselines:
        return _note("sweep.json has no baselines.")
    rows = [[_e(b.get("method", "?")), _f(b.get("budget"), ".3g"), _e(describe_plan(b.get("plan"))),
             _pct(b.get("flops_removed")), _measured(b, "prefill"), _measured(b, "decode"),
             _with_ci(b.get("accuracy"), b.get("accuracy_ci")),
             _with_ci(b.get("accuracy_kept"), b.get("accuracy_kept_ci"))] for b in baselines]  # fmt: skip
    headers = ["method", "budget", "decisions", "FLOPs saved", "prefill", "decode", "accuracy", "accuracy kept"]
    parts = [charts.svg(_pareto_figure(baselines), "Accuracy kept against prefill FLOPs removed, each method at every "
                        "budget (bars: 95 % paired bootstrap intervals over the same questions); dotted: 99 %.")
             if charts is not None else "",
             _table(headers, rows, "num"), "<p class='dim'>Accuracy kept: accuracy / the reference's accuracy, with "
             "its 95 % paired bootstrap interval.</p>"]
    versus = [v for v in run.sweep.get("skipit_vs_baselines") or [] if isinstance(v, dict)]
    if versus:
        rows = [[_f(v.get("budget"), ".3g"), _e(v.get("baseline", "?")),
                 _with_ci((v.get("skipit_gain_points") or {}).get("value"), v.get("skipit_gain_points"), "+.1f"),
                 f"{v.get('skipit_better', '–')} / {v.get('skipit_worse', '–')}", _f(v.get("mcnemar_p"), ".2g")]
                for v in versus]  # fmt: skip
        parts.append("<h3>skipit against each method at the same budget</h3>" + _table(
            ["budget", "method", "skipit's gain (points)", "questions skipit gets right / wrong that it does not",
             "McNemar p"], rows, "num"))
    cuts = [c for c in run.sweep.get("largest_cut_kept") or [] if isinstance(c, dict)]
    if cuts:
        level = _num(cuts[0].get("level"))
        lenient = {c.get("method"): c for c in run.sweep.get("largest_cut_not_below") or [] if isinstance(c, dict)}
        rows = [[_e(c.get("method", "?")), _e(c.get("plan") or "–"), _pct(c.get("flops_removed")),
                 _with_ci(c.get("accuracy_kept"), c.get("accuracy_kept_ci")),
                 _pct((lenient.get(c.get("method")) or {}).get("flops_removed"))] for c in cuts]  # fmt: skip
        parts.append(f"<h3>The largest cut that keeps {_pct(level)} of the accuracy</h3>" + _table(
            ["method", "plan", "FLOPs saved", "accuracy kept", "FLOPs saved, interval reaching it"], rows, "num")
            + "<p class='dim'>Of each method's plans made for a budget (and skipit's --kappa plan, made for the "
            "largest cut within a KL), the one that removes the most FLOPs with its accuracy kept at least this "
            "(point estimate); last column: the same where the upper end of the 95 % interval reaches it (the data "
            "do not show it below). Only the plans scored are tried.</p>")  # fmt: skip
    captions = run.sweep.get("captions")
    if isinstance(captions, dict) and captions.get("rows"):
        parts.append(_captions_part(captions, charts))
    return "".join(parts)


def _captions_part(captions: dict, charts: _Charts | None) -> str:
    """Captioning under the same plans (`skipit sweep --captions`): CIDEr-D kept against FLOPs removed."""
    ref = captions.get("reference") or {}
    rows = [[_f(r.get("budget"), ".3g"), _e(r.get("method", "?")), _pct(r.get("flops_removed")),
             _with_ci(r.get("cider"), r.get("cider_ci"), ".3f"), _with_ci(r.get("cider_kept"), r.get("cider_kept_ci")),
             _with_ci((r.get("skipit_gain") or {}).get("value"), r.get("skipit_gain"), "+.3f")]
            for r in captions["rows"]]  # fmt: skip
    parts = [f"<h3>Captioning under the same plans</h3><p>Greedy captions of {_e(captions.get('n_images', '?'))} "
             f"images; the untouched model's CIDEr-D: {_with_ci(ref.get('cider'), ref.get('cider_ci'), '.3f')}.</p>"]
    if charts is not None:
        parts.append(charts.svg(_pareto_figure(captions["rows"], "cider_kept", "CIDEr-D kept (%)"),
                                "CIDEr-D kept against prefill FLOPs removed, under the plans compared above (bars: "
                                "95 % paired bootstrap intervals over the same images)."))  # fmt: skip
    parts.append(_table(["budget", "method", "FLOPs saved", "CIDEr-D", "CIDEr-D kept", "skipit's gain (CIDEr-D)"],
                        rows, "num"))
    return "".join(parts)


CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 0 auto; max-width: 1180px; padding: 0 24px 48px; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; margin: 24px 0 4px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 1.02em; margin: 18px 0 6px; }
nav { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid #eee; z-index: 1; }
nav a { margin-right: 14px; color: #225; text-decoration: none; font-size: .92em; }
figure.chart { margin: 12px 0; } figure.chart svg { max-width: 100%; height: auto; display: block; }
figcaption, .dim { color: #666; font-size: .88em; }
.note { background: #f6f6f2; border-left: 4px solid #c9c39a; padding: 6px 10px; color: #555; }
.warn { background: #fdf0ef; border-left: 4px solid #d62728; padding: 6px 10px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .88em; margin: 6px 0; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #fafafa; }
table.num td:nth-child(n+5) { text-align: right; font-variant-numeric: tabular-nums; }
table.kv td:first-child { color: #555; white-space: nowrap; }
table.costs td { text-align: right; padding: 2px 5px; font-variant-numeric: tabular-nums; }
table.costs td:first-child { text-align: left; white-space: nowrap; }
table.costs .ok { background: #d8f0d0; padding: 0 3px; }
.lost { color: #b3261e; font-weight: 600; }
.legend .swatch { display: inline-block; width: 14px; height: 10px; margin: 0 4px 0 10px; opacity: .6; }
"""

# Records script errors before anything else runs; then counts the charts the browser actually drew (an <svg> with a
# non-empty box and marks in it) and the resources it fetched (none: the page is self-contained), again once loaded.
# The browser test reads them from #render-check in the rendered DOM.
HEAD_JS = """window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });"""
TAIL_JS = """(function () {
  function check() {
    var drawn = 0;
    document.querySelectorAll("figure.chart").forEach(function (f) {
      var svg = f.querySelector("svg"), box = svg && svg.getBoundingClientRect();
      if (box && box.width > 0 && box.height > 0 && svg.querySelector("path, use")) { drawn += 1; }
    });
    var out = document.getElementById("render-check");
    out.setAttribute("data-rendered", String(drawn));
    out.setAttribute("data-errors", String(window.__errors.length));
    out.setAttribute("data-resources", String(performance.getEntriesByType("resource").length));
    out.textContent = drawn + " of " + out.getAttribute("data-expected") + " charts drawn";
  }
  check();
  window.addEventListener("load", check);
})();"""

SECTIONS = (("measures", "Per-layer measures"), ("var", "VAR profile"), ("plan", "Plan"),
            ("degradation", "Predicted vs measured degradation"), ("speed", "Speed"), ("baselines", "Baselines"))


def _guarded(source: str, section, *args) -> str:
    """A section drawn from an optional file; a file of another shape than expected gives a note, not a crash."""
    try:
        return section(*args)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return _note(f"{source} does not have the expected shape, so this section is left out ({type(e).__name__}: "
                     f"{e}).")


def render(run: Run) -> str:
    """The whole page as one HTML string."""
    charts = _Charts()
    body = {
        "measures": _measures_section(run, charts),
        "var": _var_section(run, charts),
        "plan": _guarded("plan.json", _plan_section, run),
        "degradation": _guarded("sweep.json", _scatter_section, run, charts),
        "speed": _guarded("sweep.json", _speed_section, run),
        "baselines": _guarded("sweep.json", _baselines_section, run, charts),
    }
    from skipit import __version__

    n_charts = sum(text.count('<figure class="chart">') for text in body.values())

    title = f"skipit report: {Path(str(_or(run.analysis.model.path, run.dir))).name}"
    nav = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{_e(name)}</h2>{body[key]}</section>' for key, name in SECTIONS)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="skipit {_e(__version__)}">
<title>{_e(title)}</title>
<style>{CSS}</style>
<script>{HEAD_JS}</script>
</head>
<body>
<h1>{_e(title)}</h1>
{_header(run)}
<nav>{nav}</nav>
{sections}
<footer class="dim"><p>Layer j maps X_j to X_j+1 (X_0: input embeddings). Written by skipit {_e(__version__)}
from {_e(run.dir.name)}/; self-contained: no file or network access needed to read it.</p>
<p id="render-check" data-expected="{n_charts}" data-rendered="" data-errors="" data-resources="">
{n_charts} charts</p></footer>
<script>{TAIL_JS}</script>
</body>
</html>
"""


def save_report(run: Run) -> Path:
    """Write RUN_DIR/report.html for a loaded run (atomically: a temp file renamed) and return its path."""
    return write_text(run.dir / REPORT, render(run))


def write_report(run_dir: str | Path) -> Path:
    """Read RUN_DIR and write RUN_DIR/report.html (see `load_run` for what is required); returns its path."""
    return save_report(load_run(run_dir))
