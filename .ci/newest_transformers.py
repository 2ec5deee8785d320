"""Install the newest transformers release that pyproject.toml's range admits, and fail unless it is the one installed.

    python .ci/newest_transformers.py VENV

A plain `pip install --upgrade transformers` quietly settles for an older release when one of the newest's
requirements is missing from the package index (5.25.0 needs kernels>=0.19.1, which an index may not have yet): the
run would then test an old release and say nothing. Such a release is installed here without resolving its
requirements, and those left unmet are printed as warnings; the engine's tests then decide whether it works
(transformers imports optional packages such as kernels only when they are installed).
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

venv = Path(sys.argv[1])
pip = [str(venv / "bin/pip"), "--disable-pip-version-check"]
project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
declared = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "transformers")


def installed() -> str:
    code = "import transformers; print(transformers.__version__)"
    return subprocess.run([venv / "bin/python", "-c", code], capture_output=True, text=True, check=True).stdout.strip()


subprocess.run([*pip, "install", "--quiet", "--upgrade", "--upgrade-strategy", "only-if-needed", str(declared)],
               check=True)  # fmt: skip
listing = subprocess.run([*pip, "index", "versions", "transformers"], capture_output=True, text=True).stdout
found = re.search(r"Available versions: (.*)", listing)
if not found:
    sys.exit("error: could not read the transformers releases from the package index")
releases = [Version(v) for v in found.group(1).split(", ")]
newest = str(max(v for v in releases if not v.is_prerelease and declared.specifier.contains(v)))
if installed() != newest:
    print(f"warning: pip resolved transformers {installed()}, but the newest release in {declared} is {newest}; "
          f"installing {newest} without resolving its requirements", file=sys.stderr)  # fmt: skip
    subprocess.run([*pip, "install", "--quiet", "--no-deps", f"transformers=={newest}"], check=True)
    unmet = subprocess.run([*pip, "check"], capture_output=True, text=True).stdout
    for line in unmet.splitlines():
        print(f"warning: unmet: {line}", file=sys.stderr)
if installed() != newest:
    sys.exit(f"error: transformers {installed()} is installed, not the newest release {newest}")
print(f"newest run: transformers {newest}")
