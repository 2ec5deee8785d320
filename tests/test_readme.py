"""The README's Python code blocks run as written, on the real mini-llava (built on first use)."""

import os
import re
from pathlib import Path

import pytest
import torch

from skipit.data.shapes import write_split

pytestmark = pytest.mark.slow
README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    write_split(tmp_path / "data", "calibration", n=8)  # what `skipit data shapes --split calibration` writes
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a real model, unlike the tiny ones conftest tunes for
    try:
        exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert (tmp_path / "runs/a/plan.json").is_file() and (tmp_path / "runs/a/analysis.json").is_file()
    answer = eval(printed.strip().splitlines()[-1])  # the printed list of decoded answers
    assert isinstance(answer, list) and len(answer) == 1 and answer[0].strip()
