"""Classroom exercises with self-checks, one module per method (notebooks in ``notebooks/exercises``).

Each module exposes ``check_<task>(student_fn)``: it runs the student's function on several cases,
compares it with labkit's reference implementation, prints ``✅ pass``, ``❌ ... — hint: ...`` or
``⏳ not attempted`` and returns a :class:`~labkit.exercises.checks.CheckResult` (truthy on a pass).
The notebooks and their solutions are generated from ``labkit/exercises/specs`` by
``python -m labkit.exercises.build``.
"""

from labkit.exercises.checks import CheckResult, Status

__all__ = ["CheckResult", "Status"]
