"""The typed result of `skipit.analyze`: what analysis.json holds, and the accessors every consumer reads it by.

analysis.json (format "skipit-analysis", version 1), top level: format, version, created, model {path, class,
family, num_layers, hidden_size, fingerprint, shape}, data {path, n_records, records_digest}, seed, settings,
versions, layers, measures, timing. `measures` is the tree the statistics write (skipit.stats, skipit.functional_stats):

- hidden.modalities.{vision,text}: n_tokens (per layer); geometric {rho, angular, block_influence} (each mean,
  ci_low, ci_high); proximal {n_bins, tail {str(delta): P(rho > delta) per layer}}; informational {score, ci_low,
  ci_high, ...}; cka {value, ...}; decision_stability (skipit.stats.LayerStats);
- var: {var, var_normalised (mean, ci_low, ci_high), expected_share, n_queries}, null for a model without vision
  tokens (skipit.stats.AttentionStats);
- functional: logit_lens {kl, tv}, and with `analyze --ablation` ablation.{modality} {kl, tv, update_norm,
  lipschitz.{q0.5,q0.9,max}.bound, ...} (skipit.functional_stats).

`load(path)` reads and checks a file (a SkipitError of one line naming the file and what is wrong),
`AnalysisResult.save(path)` writes one atomically. This module is the only reader of the `measures` tree: the
planner, the plots, the report, the baselines and the demo use the accessors below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skipit.errors import SkipitError
from skipit.io import write_json

FORMAT, VERSION = "skipit-analysis", 1
FILENAME = "analysis.json"
GEOMETRIC = ("rho", "angular", "block_influence")
MEASURES = (*GEOMETRIC, "informational", "cka")  # the per-modality measures `AnalysisResult.measure` reads
NO_SHAPE = "this analysis predates plan support (no model shape): run skipit analyze again"


@dataclass(frozen=True)
class Series:
    """One value per decoder layer (None where undefined), with its CI bounds when the measure has them."""

    mean: list
    ci_low: list | None = None
    ci_high: list | None = None

    @classmethod
    def read(cls, stat, key: str = "mean") -> Series | None:
        """From a {key, ci_low, ci_high} entry (or a plain list); None when the entry or its values are absent."""
        if isinstance(stat, list):
            return cls(stat)
        if not isinstance(stat, dict) or not stat.get(key):
            return None
        return cls(stat[key], stat.get("ci_low"), stat.get("ci_high"))


@dataclass(frozen=True)
class VarProfile:
    """VAR: the share of the text queries' attention on vision keys, per layer."""

    share: Series
    normalised: Series | None = None  # VAR / the vision share of the keys
    expected_share: list | None = None  # the vision share of the keys (what uniform attention would give)


@dataclass(frozen=True)
class ModelInfo:
    """The measured model: where it came from, its class and family, its size, and its weights' fingerprint."""

    path: str | None = None
    class_name: str | None = None  # "class" in the file
    family: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    fingerprint: str | None = None
    shape: dict | None = None  # skipit.flops.Shape as a dict; absent from analyses made before plan support
    extra: dict = field(default_factory=dict)  # fields this version does not know, kept as they were

    def to_dict(self) -> dict:
        out = {"path": self.path, "class": self.class_name, "family": self.family, "num_layers": self.num_layers,
               "hidden_size": self.hidden_size, "fingerprint": self.fingerprint}  # fmt: skip
        if self.shape is not None:
            out["shape"] = self.shape
        return out | self.extra


@dataclass(frozen=True)
class DataInfo:
    """The calibration data: its path, how many records, and a digest of them."""

    path: str | None = None
    n_records: int | None = None
    records_digest: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": self.path, "n_records": self.n_records, "records_digest": self.records_digest} | self.extra


@dataclass(frozen=True)
class AnalysisResult:
    """The content of analysis.json, typed. `measures` is the measures tree as written (module docstring); read
    it through the accessors, which name what they return."""

    model: ModelInfo
    data: DataInfo
    layers: list[int]
    measures: dict
    created: str | None = None
    seed: int | None = None
    settings: dict = field(default_factory=dict)  # batch size, ablation, world size, stats and measure configs
    versions: dict = field(default_factory=dict)  # skipit, torch, transformers, numpy, python
    timing: dict | None = None
    extra: dict = field(default_factory=dict)  # top-level fields this version does not know, kept as they were

    # ------------------------------------------------------------------ files

    @classmethod
    def from_dict(cls, data, source: str = "analysis") -> AnalysisResult:
        """Check a parsed analysis.json; errors are one line starting with `source` (the file, in `load`)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SkipitError(f'{source} is not a skipit analysis (expected "format": "{FORMAT}")')
        version = data.get("version")
        if version != VERSION or isinstance(version, bool):
            raise SkipitError(f"{source}: analysis format version {version!r} is not supported "
                              f"(this skipit reads {VERSION})")  # fmt: skip

        def bad(what: str):
            return SkipitError(f"{source} is malformed: {what}")

        layers = data.get("layers")
        if not isinstance(layers, list) or not all(_is_int(j) for j in layers):
            raise bad(f'"layers" must be a list of layer indices, got {_short(layers)}')
        measures = data.get("measures")
        if not isinstance(measures, dict):
            raise bad(f'"measures" must be an object, got {_short(measures)}')
        hidden = measures.get("hidden")
        mods = hidden.get("modalities") if isinstance(hidden, dict) else None
        if not isinstance(mods, dict):
            raise bad('"measures.hidden.modalities" must be an object of per-modality measures')
        for m, entry in mods.items():
            n = entry.get("n_tokens") if isinstance(entry, dict) else None
            if not isinstance(n, list) or len(n) != len(layers) or not all(_is_int(c) for c in n):
                raise bad(f'"measures.hidden.modalities.{m}.n_tokens" must hold one token count per layer '
                          f"({len(layers)}), got {_short(n)}")  # fmt: skip
        var = measures.get("var")
        if var is not None and not (isinstance(var, dict) and isinstance(var.get("var"), dict)):
            raise bad(f'"measures.var" must be null or an object with "var", got {_short(var)}')
        functional = measures.get("functional")
        if functional is not None and not isinstance(functional, dict):
            raise bad(f'"measures.functional" must be an object, got {_short(functional)}')

        model = _object(data, "model", bad)
        checks = {"num_layers": _is_int, "hidden_size": _is_int, "path": _is_str, "class": _is_str,
                  "family": _is_str, "fingerprint": _is_str}  # fmt: skip
        _check_fields(model, checks, "model", bad)
        shape = model.get("shape")
        if shape is not None and (not isinstance(shape, dict) or not all(_is_int(v) for v in shape.values())):
            raise bad(f'"model.shape" must be an object of integers, got {_short(shape)}')
        info = _object(data, "data", bad)
        _check_fields(info, {"n_records": _is_int, "path": _is_str, "records_digest": _is_str}, "data", bad)
        _check_fields(data, {"created": _is_str, "seed": _is_int, "settings": _is_dict, "versions": _is_dict,
                             "timing": _is_dict}, None, bad)  # fmt: skip

        known = {"path", "class", "family", "num_layers", "hidden_size", "fingerprint", "shape"}
        top = {"format", "version", "created", "model", "data", "seed", "settings", "versions", "layers", "measures",
               "timing"}  # fmt: skip
        return cls(
            model=ModelInfo(model.get("path"), model.get("class"), model.get("family"), model.get("num_layers"),
                            model.get("hidden_size"), model.get("fingerprint"), shape,
                            {k: v for k, v in model.items() if k not in known}),
            data=DataInfo(info.get("path"), info.get("n_records"), info.get("records_digest"),
                          {k: v for k, v in info.items() if k not in ("path", "n_records", "records_digest")}),
            layers=layers, measures=measures, created=data.get("created"), seed=data.get("seed"),
            settings=data.get("settings") or {}, versions=data.get("versions") or {}, timing=data.get("timing"),
            extra={k: v for k, v in data.items() if k not in top},
        )  # fmt: skip

    def to_dict(self) -> dict:
        """The JSON object of analysis.json (what `from_dict` reads back to an equal result)."""
        return {
            "format": FORMAT, "version": VERSION, "created": self.created, "model": self.model.to_dict(),
            "data": self.data.to_dict(), "seed": self.seed, "settings": self.settings, "versions": self.versions,
            "layers": self.layers, "measures": self.measures, "timing": self.timing,
        } | self.extra  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> AnalysisResult:
        """Read analysis.json (or RUN_DIR/analysis.json for a folder)."""
        path = Path(path)
        path = path / FILENAME if path.is_dir() else path
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise SkipitError(f"no analysis at {path}") from None
        except OSError as e:
            raise SkipitError(f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise SkipitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise SkipitError(f"{path} is not valid JSON (not UTF-8 text)") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write analysis.json (into a folder, RUN_DIR/analysis.json) atomically: a temp file renamed."""
        path = Path(path)
        return write_json(path / FILENAME if path.is_dir() else path, self.to_dict())

    # ------------------------------------------------------------------ the run

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def fingerprint(self) -> str | None:
        return self.model.fingerprint

    @property
    def shape(self):
        """The language backbone's dimensions (skipit.flops.Shape); SkipitError for an analysis without them."""
        from skipit.flops import Shape

        if self.model.shape is None:
            raise SkipitError(NO_SHAPE)
        try:
            return Shape(**self.model.shape)
        except TypeError:
            raise SkipitError(f"the analysis' model shape has other fields than skipit's: {NO_SHAPE}") from None

    @property
    def measure_config(self) -> dict:
        """The measure settings of the run (skipit.stats.MeasureConfig as a dict; empty when not recorded)."""
        config = self.settings.get("measure_config")
        return config if isinstance(config, dict) else {}

    @property
    def ci_level(self) -> float | None:
        level = self.measure_config.get("ci_level")
        return float(level) if _is_num(level) else None

    # ------------------------------------------------------------------ hidden-state measures, per modality

    @property
    def all_modalities(self) -> tuple[str, ...]:
        """Every modality with an entry, measured or not (a text-only model's analysis has an empty "vision")."""
        return tuple(self._modalities())

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the calibration data had tokens of."""
        return tuple(m for m in self._modalities() if self.n_tokens(m) > 0)

    def n_tokens(self, modality: str) -> int:
        """Tokens of `modality` measured (at the first layer)."""
        counts = self._entry(modality)["n_tokens"]
        return counts[0] if counts else 0

    def measure(self, name: str, modality: str) -> Series | None:
        """A hidden-state measure of `modality` per layer: rho, angular, block_influence (mean and CI), informational
        (the normalised conditional entropy and its CI), cka (values, no CI); None when not measured."""
        entry = self._entry(modality)
        if name in GEOMETRIC:
            geometric = entry.get("geometric")
            return Series.read(geometric.get(name)) if isinstance(geometric, dict) else None
        if name == "informational":
            return Series.read(entry.get("informational"), "score")
        if name == "cka":
            cka = entry.get("cka")
            return Series(cka["value"]) if isinstance(cka, dict) and cka.get("value") is not None else None
        raise SkipitError(f"unknown measure {name!r}; the analysis has {', '.join(MEASURES)}")

    @property
    def tail_deltas(self) -> tuple[float, ...]:
        """The deltas P(rho > delta) was measured at."""
        deltas = self.measure_config.get("tail_deltas")
        if isinstance(deltas, list) and all(_is_num(d) for d in deltas):
            return tuple(deltas)
        keys = {d for m in self._modalities() for d in self._tails(m)}
        return tuple(sorted(keys))

    def tail(self, modality: str, delta: float) -> list | None:
        """P(rho > delta) of `modality` per layer; None when delta was not measured."""
        for d, values in self._tails(modality).items():
            if abs(d - delta) < 1e-12:
                return values
        return None

    # ------------------------------------------------------------------ attention and functional measures

    @property
    def var(self) -> VarProfile | None:
        """VAR per layer; None for a model without vision tokens."""
        var = self.measures.get("var")
        if var is None:
            return None
        return VarProfile(Series.read(var["var"]) or Series([]), Series.read(var.get("var_normalised")),
                          var.get("expected_share"))  # fmt: skip

    def logit_lens(self, stat: str = "kl") -> Series | None:
        """The logit lens at the answer position, KL(P(X_j+1) || P(X_j)) ("kl") or its total variation ("tv")."""
        lens = self._functional().get("logit_lens")
        return Series.read(lens.get(stat)) if isinstance(lens, dict) else None

    @property
    def ablated_modalities(self) -> tuple[str, ...]:
        """The modalities with ablation measures (empty unless the analysis was made with `analyze --ablation`)."""
        return tuple(self._ablation())

    def ablation(self, modality: str, stat: str = "kl") -> Series | None:
        """With `analyze --ablation`: KL(P_full || P_without j's update of `modality`) ("kl"), its total variation
        ("tv") or the update's norm ("update_norm") per layer; None otherwise."""
        entry = self._ablation().get(modality)
        return Series.read(entry.get(stat)) if isinstance(entry, dict) else None

    @property
    def ablation_kl(self) -> dict[str, list]:
        """Per ablated modality, the mean ablation KL of each layer; empty without `analyze --ablation`."""
        return {m: kl.mean for m in self._ablation() if (kl := self.ablation(m, "kl")) is not None}

    def lipschitz_bound(self, modality: str, quantile: str = "q0.9") -> list | None:
        """The bound K_quantile * E||update|| on the ablation gap per layer; None when not measured."""
        entry = self._ablation().get(modality)
        lipschitz = entry.get("lipschitz") if isinstance(entry, dict) else None
        at = lipschitz.get(quantile) if isinstance(lipschitz, dict) else None
        return at.get("bound") if isinstance(at, dict) else None

    # ------------------------------------------------------------------ the tree

    def _modalities(self) -> dict:
        return self.measures["hidden"]["modalities"]

    def _entry(self, modality: str) -> dict:
        try:
            return self._modalities()[modality]
        except KeyError:
            raise SkipitError(f"the analysis has no {modality!r} modality (it has "
                              f"{', '.join(self._modalities()) or 'none'})") from None  # fmt: skip

    def _tails(self, modality: str) -> dict[float, list]:
        proximal = self._entry(modality).get("proximal")
        tails = proximal.get("tail") if isinstance(proximal, dict) else None
        out = {}
        for key, values in (tails or {}).items():
            try:
                out[float(key)] = values
            except ValueError:
                continue
        return out

    def _functional(self) -> dict:
        functional = self.measures.get("functional")
        return functional if isinstance(functional, dict) else {}

    def _ablation(self) -> dict:
        ablation = self._functional().get("ablation")
        return ablation if isinstance(ablation, dict) else {}


def load(path: str | Path) -> AnalysisResult:
    """Read and check analysis.json, or RUN_DIR/analysis.json for a folder."""
    return AnalysisResult.load(path)


def as_result(x: Any, what: str = "this") -> AnalysisResult:
    """`x` as an AnalysisResult: the result itself, or the Analysis that `skipit.analyze` returns."""
    if isinstance(x, AnalysisResult):
        return x
    inner = getattr(x, "result", None)
    if isinstance(inner, AnalysisResult):
        return inner
    hint = (": read analysis.json with skipit.result.load, or wrap its content with AnalysisResult.from_dict"
            if isinstance(x, dict) else "")  # fmt: skip
    raise SkipitError(f"{what} needs an analysis (skipit.result.AnalysisResult, or the Analysis that skipit.analyze "
                      f"returns), got {type(x).__name__}{hint}")  # fmt: skip


# ---------------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_str(x) -> bool:
    return isinstance(x, str)


def _is_dict(x) -> bool:
    return isinstance(x, dict)


def _short(x, n: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n - 3] + "..."


def _object(data: dict, key: str, bad) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f'"{key}" must be an object, got {_short(value)}')
    return value


def _check_fields(obj: dict, checks: dict, prefix: str | None, bad) -> None:
    """Every field present and not null passes its check."""
    for key, ok in checks.items():
        value = obj.get(key)
        if value is not None and not ok(value):
            name = f"{prefix}.{key}" if prefix else key
            kind = {_is_int: "an integer", _is_str: "a string", _is_dict: "an object"}[ok]
            raise bad(f'"{name}" must be {kind}, got {_short(value)}')
