"""`python -m stepd …`: the same as the `stepd` command."""

from stepd.cli import main

main()
