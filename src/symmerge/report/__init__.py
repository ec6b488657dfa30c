"""``symmerge report``: every registered method side by side on the same checkpoints, data,
seeds and hardware, beside the papers' numbers.

Three steps, each its own module: :mod:`~symmerge.report.runner` runs the settings
(:mod:`~symmerge.report.settings`) into ``results.json`` (:mod:`~symmerge.report.schema`),
and :mod:`~symmerge.report.render` draws ``report.md`` and the plots from that file alone;
:mod:`~symmerge.report.join` joins folders whose chunks ran side by side.

Example::

    from symmerge.report import run_report, write_report

    doc = run_report("runs/report", scale="smoke", settings=["same-task"])
    write_report(doc, "runs/report")
"""

from symmerge.report.join import join_reports
from symmerge.report.render import render_markdown, write_report
from symmerge.report.runner import check_scale, run_report
from symmerge.report.schema import SCHEMA_VERSION, ReportError, load_results, validate
from symmerge.report.settings import SCALES, SETTING_NAMES, settings_for

__all__ = [
    "SCALES",
    "SCHEMA_VERSION",
    "SETTING_NAMES",
    "ReportError",
    "check_scale",
    "join_reports",
    "load_results",
    "render_markdown",
    "run_report",
    "settings_for",
    "validate",
    "write_report",
]
