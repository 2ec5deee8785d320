"""The report in a real browser: headless Chromium draws every chart, runs the page's script without an error and
fetches nothing.

Set-up: Chromium is found on PATH (or $SKIPIT_CHROMIUM); if missing, it is installed with apt-get (Debian package
`chromium`) when running as root; otherwise these tests are skipped, saying why. The page's own script records what
the browser drew in #render-check (charts drawn, script errors, resources fetched), read back with --dump-dom;
console messages come from Chromium's log on stderr. With $SKIPIT_SAVE_SCREENSHOT set, the screenshot is also
copied to docs/img/report-screenshot.png.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from skipit.report import write_report

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: a page that fetches anything cannot hide it
         "--enable-logging=stderr", "--v=0"]  # fmt: skip
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "report-screenshot.png"


def _find() -> str | None:
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def _install() -> str:
    """Install Debian's chromium with apt-get; '' on success, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root, so it cannot be installed here (apt-get install chromium)"
    apt = shutil.which("apt-get")
    if apt is None:
        return "apt-get is not available to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", "chromium"]
    try:
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:  # package lists may be missing or stale
            subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True, timeout=300)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        return f"`{' '.join(e.cmd)}` timed out after {e.timeout:.0f} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"apt-get install chromium failed ({last})"
    return ""


@pytest.fixture(scope="module")
def chromium() -> str:
    if chosen := os.environ.get("SKIPIT_CHROMIUM"):
        if exe := shutil.which(chosen):
            return exe
        pytest.skip(f"SKIPIT_CHROMIUM={chosen} is not an executable: the browser test needs headless Chromium")
    exe = _find()
    if exe is None:
        why = _install()
        exe = _find()
        if exe is None:
            pytest.skip(f"headless Chromium is needed for the browser test and is not installed: {why or 'not found'}")
    return exe


def run_chromium(exe: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run with a fresh profile; fails the test if Chromium itself fails."""
    cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium exited with {done.returncode}: {done.stderr[-2000:]}"
    return done


def console_messages(stderr: str) -> list[str]:
    """The page's console output (console.log/error, uncaught exceptions) from Chromium's log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def render_check(dom: str) -> dict:
    """The attributes the page's script wrote into #render-check."""
    tag = re.search(r'<p id="render-check"([^>]*)>', dom)
    assert tag, "no #render-check in the rendered DOM"
    return dict(re.findall(r'data-([a-z]+)="([^"]*)"', tag.group(1)))


def test_console_errors_are_seen(chromium, tmp_path):
    """The checks below can fail: Chromium's log shows a page's console errors and uncaught exceptions."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("bad thing");</script>'
                    "<script>notDefined();</script></body></html>")  # fmt: skip
    done = run_chromium(chromium, tmp_path / "profile", page.as_uri(), "--dump-dom")
    messages = console_messages(done.stderr)
    assert any("bad thing" in m for m in messages) and any("Uncaught ReferenceError" in m for m in messages)


@pytest.mark.parametrize(
    ("inputs", "n_charts"),
    [({"ablation": True}, 10), ({"sweep": False}, 6), ({"plan": False, "sweep": False, "vision": False}, 5)],
    ids=["full", "no-sweep", "analysis-only-text-model"],
)
def test_every_chart_renders_without_errors(chromium, make_run, tmp_path, inputs, n_charts):
    path = write_report(make_run(**inputs))
    assert path.read_text().count('<figure class="chart">') == n_charts
    done = run_chromium(chromium, tmp_path / "profile", path.as_uri(), "--dump-dom", "--virtual-time-budget=5000")
    check = render_check(done.stdout)
    assert check["expected"] == str(n_charts)
    assert check["rendered"] == str(n_charts), f"{check['rendered']} of {n_charts} charts drawn"
    assert check["errors"] == "0", "the page's script raised"
    assert check["resources"] == "0", "the page fetched something: it is not self-contained"
    assert console_messages(done.stderr) == []


def test_screenshot(chromium, make_run, tmp_path):
    from PIL import Image

    path = write_report(make_run())
    shot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path / "profile", path.as_uri(), f"--screenshot={shot}", "--window-size=1200,3000",
                 "--hide-scrollbars", "--virtual-time-budget=5000")  # fmt: skip
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colors = image.convert("RGB").resize((300, 750)).getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, "the screenshot is (nearly) blank"
    if os.environ.get("SKIPIT_SAVE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
