"""Clinician-facing organ-volume report of one scan: ``volumes.csv``, ``report.json``, ``report.html``
(self-contained) and ``report.pdf``. See :func:`write_report`."""

from __future__ import annotations

from medseg.report.report import RESEARCH_NOTE, align_mask, pseudonym, scan_facts, write_report
from medseg.report.table import StructureRow, StructureTable, anatomical_side, structure_table

__all__ = [
    "write_report",
    "align_mask",
    "scan_facts",
    "pseudonym",
    "structure_table",
    "anatomical_side",
    "StructureRow",
    "StructureTable",
    "RESEARCH_NOTE",
]
