"""The skip plan: which decoder layers each kind of token goes through, bound to one model.

Layer indexing (everywhere in skipit): decoder layers of the language backbone are numbered 0..L-1 in the order
they run; X_0 is the input embedding (vision features included) and layer j maps X_j to X_{j+1}.

- ``late_entry = k``: vision tokens are not processed by layers 0..k-1 and first go through layer k
  (k = 0: no late entry). Two modes for layers 0..k-1:
  ``absent``: vision tokens are not in those layers' sequence at all (neither queries nor keys/values) and join at
  layer k with their input-embedding states X_0;
  ``frozen``: vision tokens stay in the sequence as keys/values, computed from their unchanged states X_0, but
  those layers do not update them.
- ``early_exit = m``: vision tokens leave after layer m: layers m+1..L-1 neither compute nor cache them
  (None: they stay to the end).
- ``skip_layers``: layers not run at all, for any token.
- ``frozen_vision_layers``: layers inside k..m that do not update vision tokens, which stay there as keys/values
  (ShortV-style; the same as ``frozen`` late entry, for any layer).
- ``prune_vision_after = p`` (with ``prune_vision_keep = f``): in each prompt, only the fraction f of the vision
  tokens (rounded up) goes on to layers p+1..m; the others leave the sequence after layer p, as in an early exit.
  ``prune_vision_rank`` says how they are chosen:
  ``attention`` (FastV): the ones the prompt's last token attends to most in layer p (mean over heads);
  ``dart`` (DART): the ones least duplicated, by cosine similarity of X_{p+1} after the final norm, w.r.t. pivot
  tokens (the vision and the following text tokens whose layer-p keys have the largest L1 norm);
  ``divprune`` (DivPrune), only with p = -1: a max-min diverse subset of the input embeddings X_0 (greedy
  farthest point on cosine distance); the others never enter layer 0.
  The choice is made once, in the forward call that carries the image, and holds for the whole generation.
  FastV's "K = 2, R = 50 %" is p = 1, f = 0.5; DART's K = 2 is p = 1 too.
- ``input_vision_keep = g``: a first stage before a pruning stage at p >= 0 (two-stage reduction, as VScan's
  reduction before the language model and pruning inside it): only the share g of the vision tokens (rounded up),
  DivPrune's choice on X_0, enters layer 0; the others are in no layer's sequence. Pruning after p then chooses among
  those that entered. f and g are both shares of the prompt's vision tokens, f < g.
So vision tokens are processed by layers k..m (minus skipped and frozen ones); a plan needs 0 <= k <= m <= L-1.
Plan files are format version 2 when they use what version 1 could not say (a ranking other than attention), 3
when they have an input stage; older versions still load.

A plan records the model it was made for (class name, layer count and a weights fingerprint); applying it to any
other model is an error. It is saved as JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from skipit.errors import SkipitError

FORMAT = "skipit-plan"
VERSION = 3  # written when the plan needs it (`Plan.to_dict`); older versions are read too
READS = (1, 2, 3)
MODES = ("absent", "frozen")
RANKS = ("attention", "dart", "divprune")  # how pruning chooses the vision tokens it keeps
BEFORE_LAYERS = -1  # prune_vision_after for a choice made from the input embeddings X_0 (DivPrune)
DART_IMAGE_PIVOTS, DART_TEXT_PIVOTS = 4, 4  # DART's pivots (its defaults): vision tokens, then text tokens after them
# What a layer does with vision tokens under a plan (text tokens go through every layer that is not skipped).
# PRUNED: only the vision tokens kept by `prune_vision_after` are processed (and cached) with the text.
ALL, ABSENT, FROZEN, SKIP, PRUNED = "all", "absent", "frozen", "skip", "pruned"


def fingerprint(model: nn.Module, n_tensors: int = 4, n_values: int = 4096) -> str:
    """A cheap hash of the weights: every parameter's shape, plus the first values of a few tensors.

    Parameters are taken in registration order, without names, so wrapping layers (as `apply_plan` does) leaves
    the fingerprint unchanged. Values are rounded to bfloat16 first, so one checkpoint has the same fingerprint in
    float32 and bfloat16.
    """
    params = list(model.parameters())
    h = hashlib.sha256()
    for p in params:
        h.update(f"{tuple(p.shape)};".encode())
    picks = {round(i * (len(params) - 1) / max(n_tensors - 1, 1)) for i in range(n_tensors)} if params else set()
    for i in sorted(picks):
        values = params[i].detach().reshape(-1)[:n_values].to("cpu", torch.bfloat16)
        h.update(values.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Plan:
    architecture: str  # the model class, e.g. "LlavaForConditionalGeneration"
    num_layers: int  # decoder layers of the language backbone
    fingerprint: str  # skipit.plan.fingerprint(model)
    late_entry: int = 0  # k
    late_entry_mode: str = "absent"
    early_exit: int | None = None  # m
    skip_layers: tuple[int, ...] = ()
    frozen_vision_layers: tuple[int, ...] = ()
    prune_vision_after: int | None = None  # p
    prune_vision_keep: float = 0.5  # f
    prune_vision_rank: str = "attention"
    input_vision_keep: float | None = None  # g
    evidence: dict = field(default_factory=dict)  # free-form: the measures and predicted saving behind the plan

    def __post_init__(self):
        for name in ("skip_layers", "frozen_vision_layers"):
            value = getattr(self, name)
            if isinstance(value, str | bytes) or not all(_is_int(j) for j in value):
                raise SkipitError(f"{name} must be a list of layer indices (integers), got {value!r}")
            setattr(self, name, tuple(sorted(set(value))))
        L, k, m = self.num_layers, self.late_entry, self.early_exit
        if not _is_int(L) or L < 1:
            raise SkipitError(f"plan num_layers must be a positive integer, got {L!r}")
        if self.late_entry_mode not in MODES:
            raise SkipitError(f"late_entry_mode must be one of {', '.join(MODES)}, got {self.late_entry_mode!r}")
        if not _is_int(k) or not 0 <= k <= L - 1:
            raise SkipitError(f"late_entry must be a layer index in 0..{L - 1} (0 = no late entry), got {k!r}")
        if m is not None and (not _is_int(m) or not 0 <= m <= L - 1):
            raise SkipitError(f"early_exit must be a layer index in 0..{L - 1} or null, got {m!r}")
        if m is not None and k > m:
            raise SkipitError(
                f"late_entry ({k}) is after early_exit ({m}): no layer would see vision tokens; use k <= m"
            )
        if bad := [j for j in self.skip_layers if not 0 <= j <= L - 1]:
            raise SkipitError(f"skip_layers {bad} out of range: layers are numbered 0..{L - 1}")
        if len(self.skip_layers) == L:
            raise SkipitError("skip_layers lists every layer: keep at least one")
        last = L - 1 if m is None else m
        if bad := [j for j in self.frozen_vision_layers if not k <= j <= last or j in self.skip_layers]:
            raise SkipitError(
                f"frozen_vision_layers {bad} must be layers that would process vision tokens ({k}..{last}) "
                "and are not skipped"
            )
        p, f = self.prune_vision_after, self.prune_vision_keep
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1:
            raise SkipitError(f"prune_vision_keep must be a fraction strictly between 0 and 1, got {f!r}")
        rank = self.prune_vision_rank
        if rank not in RANKS:
            raise SkipitError(f"prune_vision_rank must be one of {', '.join(RANKS)}, got {rank!r}")
        if p is None and rank != "attention":
            raise SkipitError(f"prune_vision_rank {rank!r} needs prune_vision_after (where the choice is made)")
        if p is not None and not _is_int(p):
            raise SkipitError(f"prune_vision_after must be a layer index (an integer) or null, got {p!r}")
        if p is not None and (rank == "divprune") != (p == BEFORE_LAYERS):
            raise SkipitError(
                f"prune_vision_after {BEFORE_LAYERS} (before layer 0) goes with prune_vision_rank 'divprune', which "
                f"ranks the input embeddings, and only with it; got prune_vision_after={p!r} with {rank!r}"
            )
        if p == BEFORE_LAYERS and k != 0:
            raise SkipitError(f"prune_vision_after {BEFORE_LAYERS} (before layer 0) needs late_entry 0, got {k!r}")
        if p not in (None, BEFORE_LAYERS) and (
            not k <= p <= last or p in self.skip_layers or p in self.frozen_vision_layers
        ):
            raise SkipitError(
                f"prune_vision_after must be a layer that updates vision tokens ({k}..{last}, not skipped or "
                f"frozen): the ranking reads it; got {p!r}"
            )
        if p is not None and (bad := [j for j in self.frozen_vision_layers if j > p]):
            raise SkipitError(f"frozen_vision_layers {bad} come after prune_vision_after ({p}): not supported")
        if (g := self.input_vision_keep) is not None:
            if isinstance(g, bool) or not isinstance(g, int | float) or not 0 < g < 1:
                raise SkipitError(f"input_vision_keep must be a fraction strictly between 0 and 1, got {g!r}")
            if p is None or p == BEFORE_LAYERS:
                raise SkipitError(
                    "input_vision_keep is the first stage of a two-stage reduction and needs a pruning stage at a "
                    f"layer (prune_vision_after >= 0); alone it is DivPrune: prune_vision_after {BEFORE_LAYERS}, "
                    "prune_vision_rank 'divprune'"
                )
            if k != 0:
                raise SkipitError(f"input_vision_keep (chosen before layer 0) needs late_entry 0, got {k!r}")
            if not f < g:
                raise SkipitError(
                    f"prune_vision_keep ({f!r}) must be below input_vision_keep ({g!r}): both are shares of the "
                    "prompt's vision tokens, and pruning keeps fewer than entered"
                )

    @classmethod
    def for_model(cls, model: nn.Module, **decisions) -> Plan:
        """A plan bound to `model`, e.g. `Plan.for_model(model, late_entry=2, early_exit=10, skip_layers=[5])`."""
        from skipit.adapters import get_adapter

        n = get_adapter(model).num_layers
        return cls(architecture=type(model).__name__, num_layers=n, fingerprint=fingerprint(model), **decisions)

    def with_decisions(self, **decisions) -> Plan:
        """A plan for the same model with only `decisions` (and no evidence)."""
        return Plan(self.architecture, self.num_layers, self.fingerprint, **decisions)

    def vision_kept(self, n_vision: int) -> int:
        """How many of a prompt's `n_vision` vision tokens pruning keeps (the share, rounded up)."""
        return math.ceil(n_vision * self.prune_vision_keep)

    def vision_entering(self, n_vision: int) -> int:
        """How many of a prompt's `n_vision` vision tokens enter layer 0 (all, unless the plan has an input stage)."""
        g = self.input_vision_keep
        return n_vision if g is None else math.ceil(n_vision * g)

    def roles(self) -> list[str]:
        """What each layer does with vision tokens: 'all' (processes them), 'absent', 'frozen', 'pruned' (only the
        kept ones) or 'skip'."""
        out = []
        for j in range(self.num_layers):
            if j in self.skip_layers:
                out.append(SKIP)
            elif j < self.late_entry:
                out.append(FROZEN if self.late_entry_mode == "frozen" else ABSENT)
            elif self.early_exit is not None and j > self.early_exit:
                out.append(ABSENT)
            elif j in self.frozen_vision_layers:
                out.append(FROZEN)
            elif self.prune_vision_after is not None and j > self.prune_vision_after:
                out.append(PRUNED)
            else:
                out.append(ALL)
        return out

    @property
    def is_empty(self) -> bool:
        return all(r == ALL for r in self.roles())

    def check(self, model: nn.Module) -> None:
        """Raise SkipitError unless this plan was made for `model`."""
        from skipit.adapters import get_adapter

        name = type(model).__name__
        if name != self.architecture:
            raise SkipitError(f"plan was made for a {self.architecture}, not a {name}: make a plan for this model")
        n = get_adapter(model).num_layers
        if n != self.num_layers:
            raise SkipitError(f"plan was made for {self.num_layers} decoder layers, this model has {n}: re-plan")
        if fingerprint(model) != self.fingerprint:
            raise SkipitError("plan was made for other weights (fingerprint differs): make a plan for this checkpoint")

    def to_dict(self) -> dict:
        """The plan file's JSON object: version 1 (readable by older skipit) unless the plan needs version 2."""
        out = {
            "format": FORMAT, "version": VERSION, **asdict(self),
            "skip_layers": list(self.skip_layers), "frozen_vision_layers": list(self.frozen_vision_layers),
        }  # fmt: skip
        if self.input_vision_keep is None:  # what version 2 says, without the field it lacks
            out["version"] = 2
            del out["input_vision_keep"]
            if self.prune_vision_rank == "attention":  # ... and version 1
                out["version"] = 1
                del out["prune_vision_rank"]
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        """A plan from its JSON object, checked field by field against `PlanFile` (types exactly, no coercion),
        then for the relations between fields; errors name `source` and the field."""
        if data.get("format") != FORMAT:
            raise SkipitError(f'{source} is not a skipit plan (expected "format": "{FORMAT}")')
        if (version := data.get("version")) not in READS or isinstance(version, bool):
            raise SkipitError(
                f"{source}: plan format version {version!r} is not supported "
                f"(this skipit reads {', '.join(map(str, READS))})"
            )
        if version == 1 and "prune_vision_rank" in data:
            raise SkipitError(f"{source}: prune_vision_rank needs plan format version 2, the file says 1")
        if version < 3 and "input_vision_keep" in data:
            raise SkipitError(f"{source}: input_vision_keep needs plan format version 3, the file says {version}")
        try:
            checked = PlanFile.model_validate(data)
        except ValidationError as e:
            errors = e.errors()
            if unknown := sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden"):
                raise SkipitError(
                    f"{source}: unknown plan fields {unknown}: the file was not written by this skipit"
                ) from None
            if missing := sorted(str(err["loc"][0]) for err in errors if err["type"] == "missing"):
                raise SkipitError(f"{source}: plan is missing {missing}") from None
            error = errors[0]
            where = ".".join(str(part) for part in error["loc"])
            raise SkipitError(f"{source}: field {where!r}: {error['msg'].lower()}, got {error['input']!r}") from None
        return cls(**checked.model_dump(exclude={"format", "version"}))

    def save(self, path: str | Path) -> Path:
        from skipit.io import write_json

        return write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if path.is_dir():
            raise SkipitError(f"plan file {path} is a directory: give the plan's JSON file (e.g. {path}/plan.json)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SkipitError(f"plan file {path} does not exist") from None
        except UnicodeDecodeError:
            raise SkipitError(f"plan file {path} is not text (a binary file?): give a plan written by skipit") from None
        except json.JSONDecodeError as e:
            raise SkipitError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise SkipitError(f"plan file {path} does not hold a JSON object")
        return cls.from_dict(data, source=f"plan file {path}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class PlanFile(BaseModel):
    """The schema of a plan file: every field's JSON type, strictly (13.7, true or "13" is not a layer index)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    format: Literal["skipit-plan"]
    version: Literal[1, 2, 3]
    architecture: str
    num_layers: int
    fingerprint: str
    late_entry: int = 0
    late_entry_mode: Literal["absent", "frozen"] = "absent"
    early_exit: int | None = None
    skip_layers: list[int] = []
    frozen_vision_layers: list[int] = []
    prune_vision_after: int | None = None
    prune_vision_keep: float = 0.5
    prune_vision_rank: Literal["attention", "dart", "divprune"] = "attention"
    input_vision_keep: float | None = None
    evidence: dict = {}
