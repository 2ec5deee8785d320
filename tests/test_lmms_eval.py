"""The lmms-eval plugin: `--model skipit` on the `shapes_vqa` task reports what skipit's own `vqa.evaluate` reports,
with and without a skip plan."""

import math
import os

import pytest
import torch

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed: pip install 'skipit[lmms]' && pip install --no-deps lmms-eval==0.7.3",
)

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from skipit import models  # noqa: E402
from skipit.data import shapes  # noqa: E402
from skipit.data.jsonl import load_records  # noqa: E402
from skipit.evaluation import vqa  # noqa: E402
from skipit.lmms import TASKS_DIR  # noqa: E402
from skipit.lmms.model import SkipitLMM  # noqa: E402
from skipit.lmms.shapes_vqa import doc_to_text, doc_to_visual  # noqa: E402
from skipit.plan import Plan  # noqa: E402
from skipit.skipping import apply_plan, remove_plan  # noqa: E402

TASK = "shapes_vqa"


def run_lmms_eval(model_path, plan_path=None, data=None, limit=8, batch_size=4):
    """(metrics lmms-eval reports for shapes_vqa, its answers in document order), through its Python API."""
    model_args = f"pretrained={model_path}" + (f",plan={plan_path}" if plan_path else "")
    task = {"task": TASK, "dataset_kwargs": {"data_files": {"test": str(data)}}} if data else TASK
    out = simple_evaluate(
        model="skipit", model_args=model_args, tasks=[task], limit=limit, batch_size=batch_size, log_samples=True,
        task_manager=TaskManager("WARNING", include_path=str(TASKS_DIR)), verbosity="WARNING",
    )  # fmt: skip
    metrics = {k.removesuffix(",none"): v for k, v in out["results"][TASK].items() if k.endswith(",none")}
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    answers = [s["filtered_resps"] for s in samples]
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    return metrics, answers


def skipit_evaluate(model, processor, records, plan=None, batch_size=4):
    if plan is not None:
        apply_plan(model, plan)
    try:
        return vqa.evaluate(model, processor, records, batch_size=batch_size)
    finally:
        remove_plan(model)


def assert_same_scores(metrics: dict, answers: list[str], ours: dict) -> None:
    assert answers == [p["prediction"] for p in ours["predictions"]]
    assert metrics["exact_match"] == pytest.approx(ours["accuracy"])
    for t in shapes.QUESTION_TYPES:
        if t in ours["per_type"]:
            assert metrics[f"exact_match_{t}"] == pytest.approx(ours["per_type"][t]["accuracy"]), t
        else:
            assert math.isnan(metrics[f"exact_match_{t}"]), t


def test_model_comes_from_the_entry_point_and_the_task_from_the_include_path():
    assert get_model("skipit") is SkipitLMM
    assert TASK in TaskManager("WARNING", include_path=str(TASKS_DIR)).all_tasks


def test_prompt_is_skipits(tiny_llava_dir):
    lm = SkipitLMM(pretrained=str(tiny_llava_dir))
    doc = {"question": "What color is the circle?"}
    assert lm.prompt(doc_to_text(doc), 1) == vqa.prompt_text(lm.processor, doc["question"])


def test_tiny_model_scores_equal_skipits_with_and_without_a_plan(tiny_llava, tiny_llava_dir, tmp_path):
    model, processor = tiny_llava
    data = shapes.write_split(tmp_path / "shapes", "test", n=7)
    records = load_records(data)
    plan = Plan.for_model(model, late_entry=1, early_exit=3, skip_layers=[4])
    plan_path = plan.save(tmp_path / "plan.json")
    for p, path in ((None, None), (plan, plan_path)):
        ours = skipit_evaluate(model, processor, records, p, batch_size=3)  # batches of 3, 3 and 1
        metrics, answers = run_lmms_eval(tiny_llava_dir, path, data=data, limit=None, batch_size=3)
        assert_same_scores(metrics, answers, ours)


def test_loglikelihood_of_the_greedy_answer(tiny_llava, tiny_llava_dir, tmp_path):
    model, processor = tiny_llava
    record = load_records(shapes.write_split(tmp_path / "shapes", "test", n=1))[0]
    doc = {"image": str(record.image), "question": record.question}
    plan = Plan.for_model(model, late_entry=2, early_exit=4).save(tmp_path / "plan.json")
    for plan_path in (None, plan):
        lm = SkipitLMM(pretrained=str(tiny_llava_dir), plan=plan_path)
        lm.task_dict = {"t": {"test": [doc]}}

        def request(kind, second):
            args = (doc_to_text(doc), second, doc_to_visual, 0, "t", "test")
            return Instance(kind, args, 0, {"task": "t", "doc_id": 0, "repeats": 1})

        [word] = lm.generate_until([request("generate_until", {"max_new_tokens": 1, "until": []})])
        other = "purple" if word != "purple" else "green"
        [(logprob, greedy), (other_logprob, other_greedy)] = lm.loglikelihood(
            [request("loglikelihood", word), request("loglikelihood", other)]
        )
        assert word and greedy and not other_greedy, (word, plan_path)
        assert other_logprob < logprob <= 0


@pytest.fixture
def all_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a real model, unlike the tiny ones conftest tunes for
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_mini_llava_scores_equal_skipits_with_and_without_a_plan(all_threads, tmp_path):
    from skipit.demo.build import cache_dir, ensure_built

    path = ensure_built()
    records = load_records(shapes.ensure_split(cache_dir() / "shapes", "test"), limit=8)  # the task's own data
    model, processor = models.load(path)
    plan = Plan.for_model(model, late_entry=4, early_exit=12, skip_layers=[20, 25])
    plan_path = plan.save(tmp_path / "plan.json")
    predictions = {}
    for name, p, pp in (("no plan", None, None), ("plan", plan, plan_path)):
        ours = skipit_evaluate(model, processor, records, p, batch_size=4)
        metrics, answers = run_lmms_eval(path, pp, limit=8, batch_size=4)
        assert_same_scores(metrics, answers, ours)
        predictions[name] = answers
    assert predictions["plan"] != predictions["no plan"]  # so lmms-eval's model did follow the plan
