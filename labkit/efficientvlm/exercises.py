"""Self-checks for the EfficientVLM exercises (Wang et al., ACL Findings 2023, §3.1 distillation, §3.2 pruning with
hard-concrete L0 gates from Louizos et al., ICLR 2018, §4).

References: :func:`labkit.efficientvlm.prune.hard_concrete_sample`, :func:`labkit.efficientvlm.prune.expected_l0` and
:func:`labkit.distill.layer_map`.
"""

from __future__ import annotations

import torch

from labkit.efficientvlm import distill
from labkit.efficientvlm import prune as efficient
from labkit.exercises.checks import CheckResult, Mismatch, as_tensor, expect, expect_close, run_check

_PARAMS = [("the paper's beta, gamma, zeta", {}),
           ("beta 0.5, gamma -0.2, zeta 1.2", {"beta": 0.5, "gamma": -0.2, "zeta": 1.2})]


def check_hard_concrete_sample(student_fn) -> CheckResult:
    """``hard_concrete_sample(log_alpha, u, beta, gamma, zeta)``: one gate in [0, 1] per ``log_alpha``, noise ``u`` given."""
    def case(label, log_alpha, u, params):
        def run():
            got = as_tensor(student_fn(log_alpha.clone(), u.clone(), **params), "the gates")
            expected = efficient.hard_concrete_sample(log_alpha, u, **params)
            expect(got.shape == expected.shape, f"the gates have shape {list(got.shape)}, expected {list(expected.shape)}",
                   "one gate per log_alpha, same shape")
            expect(got.min() >= 0 and got.max() <= 1, "some gates lie outside [0, 1]",
                   "after stretching to (gamma, zeta), clip to [0, 1]: that is what makes exact zeros (pruned) possible")
            expect_close(got, expected, "the gates",
                         "compare each step with the formula: the sign of the logistic noise, what beta divides, and "
                         "the stretch to (gamma, zeta) before the clip", atol=1e-5)
        return label, run

    grid_alpha = torch.linspace(-6, 6, 25).repeat_interleave(9)
    grid_u = torch.linspace(0.05, 0.95, 9).repeat(25)
    cases = [case(f"a grid of log_alpha and u, {name}", grid_alpha, grid_u, params) for name, params in _PARAMS]
    cases += [case("a single gate", torch.tensor([0.3]), torch.tensor([0.5]), {}),
              case("u close to 0 and 1: exact zeros and ones", torch.zeros(4), torch.tensor([1e-6, 1e-3, 0.999, 1 - 1e-6]),
                   {}),
              case("a [12, 64] matrix of FFN-unit gates", torch.randn(12, 64) * 2, torch.rand(12, 64).clamp(1e-4, 1 - 1e-4),
                   {})]
    return run_check("hard_concrete_sample", cases,
                     "hard_concrete_sample(log_alpha, u, beta, gamma, zeta) returns a tensor shaped like log_alpha")


def check_expected_l0(student_fn) -> CheckResult:
    """``expected_l0(log_alpha, beta, gamma, zeta)``: P(gate != 0) for each gate, the differentiable L0 penalty."""
    def case(label, log_alpha, params):
        def run():
            got = as_tensor(student_fn(log_alpha.clone(), **params), "P(gate != 0)")
            expect_close(got, efficient.expected_l0(log_alpha, **params), "P(gate != 0)",
                         "P(gate != 0) is not sigmoid(log_alpha): the stretch to (gamma, zeta) shifts log_alpha by a "
                         "term in beta, gamma and zeta (Louizos et al., eq. 12); mind its sign")
        return label, run

    cases = [case(f"log_alpha from -8 to 8, {name}", torch.linspace(-8, 8, 33), params) for name, params in _PARAMS]
    cases += [case("a single gate at log_alpha 0", torch.zeros(1), {}),
              case("a [6, 12] matrix of head gates", torch.randn(6, 12) * 3, {})]
    return run_check("expected_l0", cases, "expected_l0(log_alpha, beta, gamma, zeta) returns a tensor shaped like log_alpha")


def _as_int_list(value, what: str) -> list[int]:
    try:
        return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]
    except (TypeError, ValueError):
        raise Mismatch(f"{what} is not a list of layer indices", "return two lists of ints") from None


def check_layer_map(student_fn) -> CheckResult:
    """``layer_map(teacher_layers, student_layers)`` -> ``(hidden, attention)`` teacher indices for each student output."""
    def case(teacher, student):
        def run():
            got = student_fn(teacher, student)
            expect(isinstance(got, (tuple, list)) and len(got) == 2, "did not return a pair (hidden, attention)",
                   "return two lists: one for the hidden states, one for the attention maps")
            hidden, attention = (_as_int_list(v, w) for v, w in zip(got, ("hidden", "attention")))
            ref_hidden, ref_attention = distill.layer_map(teacher, student)
            expect(len(hidden) == len(ref_hidden), f"hidden has {len(hidden)} entries, expected {len(ref_hidden)}",
                   "the embedding output counts as hidden state 0, so there is one more hidden state than layers")
            expect(hidden == ref_hidden, f"hidden map {hidden} is wrong",
                   "student hidden state i learns from teacher hidden state i·k, with k = teacher depth / student depth")
            expect(len(attention) == len(ref_attention),
                   f"attention has {len(attention)} entries, expected {len(ref_attention)}", "one attention map per layer")
            expect(attention == ref_attention, f"attention map {attention} is wrong",
                   "each student layer copies the attention of the *last* teacher layer of its block of k layers")
        return f"teacher {teacher}, student {student}", run

    cases = [case(12, 6), case(6, 3), case(12, 4), case(4, 4), case(12, 1), case(24, 12)]
    return run_check("layer_map", cases, "layer_map(teacher_layers, student_layers) returns (hidden, attention)")
