"""The check runner behind the classroom exercises.

A check calls the student's function on a list of cases, compares each result with labkit's
reference implementation and prints one line: ``✅ PASS: ...``, ``❌ FAIL: <what failed> — hint: ...`` (the
hint points at the idea, never at the code) or ``⏳ TODO: ... not attempted yet`` while the function still
raises ``NotImplementedError``, so a notebook of stubs runs top to bottom. It returns a
:class:`CheckResult` that is truthy only on a pass. Cases run under a fixed torch seed in a forked
RNG, so a check is reproducible and leaves the notebook's random state alone.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

Case = tuple[str, Callable[[], None]]  # (label shown on failure, thunk that raises Mismatch)


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    NOT_ATTEMPTED = "not attempted"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check; ``bool(result)`` is True only when every case passed."""

    task: str
    status: Status
    message: str

    def __bool__(self) -> bool:
        return self.status is Status.PASS

    def __str__(self) -> str:
        return self.message


class Mismatch(Exception):
    """A case whose result differs from the reference: ``what`` went wrong and a ``hint`` that does not give the answer."""

    def __init__(self, what: str, hint: str):
        super().__init__(what)
        self.what, self.hint = what, hint


def expect(condition, what: str, hint: str) -> None:
    if not bool(condition):
        raise Mismatch(what, hint)


def as_tensor(value, what: str) -> torch.Tensor:
    """The student's result as a tensor (lists and numpy arrays accepted)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise Mismatch(f"{what} is a {type(value).__name__}, not a tensor", "return a torch.Tensor") from None


def expect_shape(got: torch.Tensor, shape, what: str, hint: str) -> None:
    expect(tuple(got.shape) == tuple(shape), f"{what} has shape {list(got.shape)}, expected {list(shape)}", hint)


def expect_close(got, expected: torch.Tensor, what: str, hint: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Same shape and (for bool: equal, otherwise close) values as the reference."""
    got = as_tensor(got, what)
    expected = expected.detach().cpu()
    expect_shape(got, expected.shape, what, hint)
    if expected.dtype == torch.bool:
        wrong = int((got.bool() != expected).sum())
        expect(wrong == 0, f"{what} is wrong at {wrong} of {expected.numel()} positions", hint)
        return
    expect(got.is_floating_point() or not expected.is_floating_point(), f"{what} has integer dtype {got.dtype}",
           "compute in floating point")
    expect(not torch.isnan(got).any() or torch.isnan(expected).any(), f"{what} contains NaN", hint)
    diff = (got.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    expect(not bad.any(), f"{what}: {int(bad.sum())} of {expected.numel()} values differ from the reference "
           f"(largest difference {float(diff.max()):.3g})", hint)


def _run_case(task: str, label: str, run: Callable[[], None], crash_hint: str) -> CheckResult | None:
    """None when the case passes; otherwise the not-attempted or failed result."""
    try:
        run()
    except NotImplementedError:
        return CheckResult(task, Status.NOT_ATTEMPTED,
                           f"⏳ TODO: {task} is not attempted yet: it still raises NotImplementedError "
                           "(write its body, rerun this cell)")
    except Mismatch as m:
        return CheckResult(task, Status.FAIL, f"❌ FAIL: {task}, case '{label}': {m.what} — hint: {m.hint}")
    except Exception as e:  # the student's code crashed: report it like a failed case
        return CheckResult(task, Status.FAIL,
                           f"❌ FAIL: {task}, case '{label}': your function raised {type(e).__name__}: {e} — hint: {crash_hint}")
    return None


def run_check(task: str, cases: Iterable[Case], crash_hint: str, seed: int = 0, verbose: bool = True) -> CheckResult:
    """Run ``cases`` in order, stop at the first that does not pass; print and return the result."""
    cases = list(cases)
    result = CheckResult(task, Status.PASS, f"✅ PASS: {task} ({len(cases)} cases)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for label, run in cases:
            failure = _run_case(task, label, run, crash_hint)
            if failure is not None:
                result = failure
                break
    if verbose:
        print(result.message)
    return result
