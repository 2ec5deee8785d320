"""`python -m skipit ...` is the `skipit` command."""

from skipit.cli import main

main()
