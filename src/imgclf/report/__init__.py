"""Reports of run folders: one self-contained HTML page, or Markdown with PNGs beside it."""

from imgclf.report.build import Report, build_report
from imgclf.report.collect import RunInfo, find_runs, read_runs

__all__ = ["Report", "RunInfo", "build_report", "find_runs", "read_runs"]
