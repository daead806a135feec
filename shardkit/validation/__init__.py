"""Validate checkpoints: every problem of a local folder or a Hub repo, with stable codes, from headers alone.

:func:`validate` is the entry point; :class:`Report` and :class:`Finding` are what it returns, and
:data:`CODES` lists every code with its severity and meaning.
"""

from .api import validate
from .report import CODES, ERROR, WARNING, Finding, Report

__all__ = ["validate", "Report", "Finding", "CODES", "ERROR", "WARNING"]
