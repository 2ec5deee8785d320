import subprocess
import sys


def test_python_dash_m_skipit_is_the_skipit_command():
    out = subprocess.run([sys.executable, "-m", "skipit", "plan", "/nonexistent-run"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
