"""`python -m skipit.lmms` prints the folder to pass to lmms-eval's --include_path."""

from skipit.lmms import TASKS_DIR

print(TASKS_DIR)
