"""MedExGen: chest X-ray report generation on IU X-Ray (see README.md and ../shared/DESIGN.md).

Entry points: ``phantom.make_phantom_dataset``, ``reports.read_reports``,
``labeler.label_report``, ``metrics.score``, ``model.ReportGenerator`` and
``python -m medexgen_lib run|train|generate|score``. Importing the package
loads nothing heavy: ``python3 -m medexgen_lib.bootstrap`` runs on a bare Python.
"""
