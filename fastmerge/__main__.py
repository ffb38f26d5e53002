"""`python -m fastmerge ...`: the `fastmerge` console script (see fastmerge.console)."""

from .console import fastmerge

fastmerge()
