"""Comparison reports of recorded runs (`python -m sweep.report`): selection.py picks the runs, objective.py names
what ranks them, load.py reads a load sweep, tables.py and plots.py (load_plots.py) write the files, build.py puts
them together, cli.py is the command line."""

from sweep.report.build import build_report
from sweep.report.errors import ReportError
from sweep.report.selection import Report

__all__ = ["Report", "ReportError", "build_report"]
