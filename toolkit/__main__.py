"""`python -m toolkit ...` is `toolkit-train ...`."""

from toolkit.cli.train import main

main()
