"""Long work is never silent: off a terminal, progress comes as plain lines."""

from rich.console import Console

from skipit.progress import progress


def test_plain_lines_off_a_terminal(capsys):
    bar = progress("ex", console=Console(force_terminal=False, file=open("/dev/null", "w")))  # noqa: SIM115
    bar.every = 0.0
    with bar:
        task = bar.add_task("1/4 analyze", total=3)
        for _ in range(3):
            bar.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["1/4 analyze: 1/3 ex", "1/4 analyze: 2/3 ex",
                                                      "1/4 analyze: 3/3 ex"]


def test_a_terminal_gets_the_bar_only(capsys):
    bar = progress("ex", console=Console(force_terminal=True, file=open("/dev/null", "w")))  # noqa: SIM115
    with bar:
        task = bar.add_task("x", total=2)
        bar.advance(task, 2)
    assert capsys.readouterr().err == ""
