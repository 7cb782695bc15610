"""`python -m fae.cli ...`: the `fae` command (Lightning's DDP launcher starts its workers this way)."""

from fae.cli import main

main()
