"""`skipit.analyze`: per-layer, per-modality redundancy measures of a model from an unlabelled calibration set.

Streaming (memory does not grow with the number of examples), resumable (with a run folder, the accumulated
statistics are saved to RUN_DIR/shards/ every few batches, and a rerun with the same settings continues after the
last saved batch) and distributed (under torchrun each rank measures records[rank::world]; rank 0 merges the
statistics, which merge exactly, and writes the result).

The result is a `skipit.result.AnalysisResult`, written as analysis.json (its schema, loading and accessors are in
skipit.result): the measures of hidden states per modality (skipit.stats.LayerStats), VAR (skipit.stats.AttentionStats,
null when the model has no vision tokens) and the functional ones (skipit.functional_stats).
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from skipit.capture import Calibrator
from skipit.errors import SkipitError
from skipit.flops import Shape
from skipit.functional_stats import FunctionalStats
from skipit.prompts import record_inputs
from skipit.result import VERSION, AnalysisResult, DataInfo, ModelInfo
from skipit.stats import AttentionStats, LayerStats, MeasureConfig, Stats, StatsConfig, decode_meta, encode_meta

SHARD_FORMAT = "skipit-analysis-shard"
PARTS: dict[str, type[Stats]] = {"layer": LayerStats, "attention": AttentionStats, "functional": FunctionalStats}


@dataclass
class Analysis:
    """The result of `analyze`: `result` is the typed content of analysis.json (skipit.result.AnalysisResult);
    `stats` the merged accumulators ({"layer", "attention", "functional"}), to finalize again with other measure
    settings."""

    result: AnalysisResult
    stats: dict | None = None

    @property
    def measures(self) -> dict:
        return self.result.measures

    def save(self, run_dir: str | Path) -> Path:
        """RUN_DIR/analysis.json and one PNG per measure, each written atomically; returns the JSON's path."""
        from skipit.plots import plot_analysis

        run_dir = Path(run_dir)
        plot_analysis(self.result, run_dir)
        return self.result.save(run_dir / "analysis.json")

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        """analysis.json, or RUN_DIR/analysis.json for a folder (see skipit.result.load)."""
        return cls(AnalysisResult.load(path))


# ---------------------------------------------------------------- inputs


def batch_inputs(processor, records: Sequence, vision: bool) -> dict:
    """Model inputs for a batch of records (left-padded, on the CPU): `skipit.prompts.record_inputs`, the inputs
    evaluation answers from. A model without vision gets the question as text, preceded by the record's caption when
    it has one (the caption then stands in for the image), in the tokenizer's chat template when it has one.
    """
    return record_inputs(processor, records, vision)


# ---------------------------------------------------------------- distribution and shards


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def distributed_from_env():
    """Join the process group when launched by torchrun (WORLD_SIZE > 1; gloo, CPU); leave it on exit."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard_path(run_dir: Path, rank: int, world: int) -> Path:
    return run_dir / "shards" / f"rank{rank:03d}-of-{world:03d}.safetensors"


def save_shard(path: Path, stats: dict, run: dict) -> None:
    """All accumulators and the run's identity in one safetensors file, written to a temp file and renamed."""
    from safetensors.torch import save_file

    tensors = {"run": encode_meta(run)}
    for name, part in stats.items():
        if part is not None:
            tensors |= {f"{name}.{k}": v.contiguous() for k, v in part.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_shard(path: Path) -> tuple[dict, dict]:
    """(run identity, {part: accumulator})."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        run = decode_meta(tensors.pop("run"))
    except Exception as e:  # a truncated or foreign file
        raise SkipitError(f"cannot read shard {path} ({type(e).__name__}): delete it to start over") from None
    stats = {}
    for name, cls in PARTS.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        stats[name] = cls.from_state_dict(sd) if sd else None
    return run, stats


def _state(stats: dict) -> dict:
    return {name: None if part is None else part.state_dict() for name, part in stats.items()}


def _merge(states: Sequence[dict]) -> dict:
    merged = {}
    for name, cls in PARTS.items():
        parts = [cls.from_state_dict(s[name]) for s in states if s[name] is not None]
        merged[name] = parts[0] if parts else None
        for part in parts[1:]:
            merged[name].merge(part)
    return merged


def records_digest(records: Sequence, labels: bool = False) -> str:
    """A hash of the records' inputs (id, image, question, caption) and, with `labels`, of what scores them too
    (answer, answers, question type)."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.id}\0{r.image}\0{r.question}\0{r.caption}\n".encode())
        if labels:
            h.update(f"{r.answer}\0{r.answers}\0{r.extra.get('type')}\n".encode())
    return h.hexdigest()[:16]


def versions() -> dict:
    """The versions of skipit, torch, transformers, numpy and Python: what a result file records."""
    import numpy
    import transformers

    import skipit

    return {"skipit": skipit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------- the analysis


def analyze(
    model,
    processor,
    records: Sequence,
    *,
    batch_size: int = 8,
    ablation: bool = False,
    seed: int = 0,
    run_dir: str | Path | None = None,
    shard_every: int = 10,
    stats_config: StatsConfig | None = None,
    measure_config: MeasureConfig | None = None,
    model_path: str | None = None,
    data_path: str | None = None,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Analysis | None:
    """Measure `model` on `records` (skipit.data.jsonl.Record: image + question; no answers needed).

    With `run_dir`, writes RUN_DIR/analysis.json and the plots, and keeps the accumulated statistics in
    RUN_DIR/shards/ every `shard_every` batches: a rerun with the same settings resumes after the last saved
    batch. Under torch.distributed (e.g. torchrun, gloo) every rank takes records[rank::world]; rank 0 merges,
    writes and returns the Analysis, the other ranks return None. `on_batch(n)` is called after each batch of n.
    """
    from skipit.adapters import get_adapter
    from skipit.plan import fingerprint

    if not records:
        raise SkipitError("no records to analyze")
    if batch_size < 1 or shard_every < 1:
        raise SkipitError("batch_size and shard_every must be at least 1")
    config = stats_config or StatsConfig(seed=seed)
    measure_config = measure_config or MeasureConfig()
    rank, world = rank_and_world()
    adapter = get_adapter(model)
    has_vision = bool(adapter.vision_token_ids())
    settings = {"batch_size": batch_size, "ablation": ablation, "world_size": world, "stats_config": asdict(config),
                "text_queries": "prompt tokens (no generated continuation)",
                "answer_position": "last prompt token", "attention_during_calibration": "eager"}
    identity = {"format": SHARD_FORMAT, "version": VERSION, "fingerprint": fingerprint(model),
                "records": records_digest(records), "n_records": len(records), "settings": settings}

    mine = list(records)[rank::world]
    calibrator = Calibrator(model, config, ablation=ablation, attention=has_vision)
    stats = {"layer": calibrator.layer_stats, "attention": calibrator.attention_stats,
             "functional": calibrator.functional_stats}
    shard = _shard_path(Path(run_dir), rank, world) if run_dir is not None else None
    done = 0
    if shard is not None and shard.is_file():
        run, saved = load_shard(shard)
        done = run.pop("done")
        if run != identity:
            raise SkipitError(f"{shard.parent} holds a run with other settings, model or data: use another output "
                              "folder, or delete its shards/ to start over")
        _load_into(calibrator, saved)

    start = time.perf_counter()
    todo = mine[done:]
    bar = _progress(progress and rank == 0, len(todo), done)
    with bar as (advance), calibrator:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            calibrator.update(batch_inputs(processor, batch, has_vision), [r.id for r in batch])
            done += len(batch)
            advance(len(batch))
            if shard is not None and ((i // batch_size + 1) % shard_every == 0 or done == len(mine)):
                save_shard(shard, stats, identity | {"done": done})
            if on_batch is not None:
                on_batch(len(batch))
    seconds = time.perf_counter() - start

    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(_state(stats), gathered, dst=0)
        if rank != 0:
            return None
        stats = _merge(gathered)
    t0 = time.perf_counter()
    measures = {
        "hidden": stats["layer"].finalize(measure_config),
        "var": stats["attention"].finalize(measure_config.ci_level) if stats["attention"] is not None else None,
        "functional": stats["functional"].finalize(measure_config.ci_level),
    }
    result = AnalysisResult(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=ModelInfo(path=model_path or getattr(model.config, "_name_or_path", None) or None,
                        class_name=type(model).__name__, family=adapter.family, num_layers=adapter.num_layers,
                        hidden_size=adapter.hidden_size, fingerprint=identity["fingerprint"],
                        shape=asdict(Shape.from_model(model))),
        data=DataInfo(path=None if data_path is None else str(data_path), n_records=len(records),
                      records_digest=identity["records"]),
        seed=config.seed,
        settings=settings | {"measure_config": asdict(measure_config), "shard_every": shard_every},
        versions=versions(),
        layers=list(range(adapter.num_layers)),
        measures=measures,
        timing={"rank0_seconds": seconds, "rank0_examples": len(todo),
                "rank0_examples_per_s": len(todo) / seconds if seconds > 0 else None,
                "finalize_seconds": time.perf_counter() - t0},
    )  # fmt: skip
    analysis = Analysis(result, stats)
    if run_dir is not None:
        analysis.save(run_dir)
    return analysis


def _load_into(calibrator: Calibrator, saved: dict) -> None:
    for name, part in (("layer", calibrator.layer_stats), ("attention", calibrator.attention_stats),
                       ("functional", calibrator.functional_stats)):
        if (part is None) != (saved[name] is None):
            raise SkipitError(f"saved shard lacks or has extra {name} statistics: delete the shards to start over")
        if part is not None:
            part.load_state_dict(saved[name].state_dict())


@contextmanager
def _progress(show: bool, total: int, resumed: int):
    """A context yielding advance(n): a rich bar with examples/s when shown, a no-op otherwise."""
    if not show:
        with nullcontext():
            yield lambda n: None
        return
    from skipit.progress import progress

    with progress("ex") as bar:
        task = bar.add_task("analyzing" + (f" (resumed after {resumed})" if resumed else ""), total=total)
        yield lambda n: bar.advance(task, n)
