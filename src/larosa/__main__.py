"""`python -m larosa` = the `larosa` console script (used on machines where it is not installed)."""

from .cli import main

main()
