"""Wiring of stages into commands: stages.py (one function per stage command), run.py (all of
them into one run directory), dataset.py (`dreamer4 dataset ...`), report.py (report.html).
Only cli.py imports this package."""
