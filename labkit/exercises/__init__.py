"""The classroom exercise engine, which knows no method: ``checks`` (run a student's function on several
cases against labkit's reference; print ``✅ PASS``, ``❌ FAIL ... — hint: ...`` or ``⏳ TODO``; return a
:class:`~labkit.exercises.checks.CheckResult`, truthy on a pass) and ``build`` (write the student notebooks
and their solutions into ``notebooks/exercises`` from each method's ``exercise_notebooks.py``, with
``python -m labkit.exercises.build``). Each method's checks live in its own ``exercises.py``.
"""

from labkit.exercises.checks import CheckResult, Status

__all__ = ["CheckResult", "Status"]
