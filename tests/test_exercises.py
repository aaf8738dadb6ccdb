"""Classroom exercises: every check accepts labkit's reference and the spec's solution, rejects known-wrong code,
reports stubs as not attempted; the committed notebooks are exactly what the specs build."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from labkit.blip2 import exercises as qformer_checks
from labkit.blip2 import qformer
from labkit.blip2 import stage1 as blip2
from labkit.clip.eval import zero_shot_classifier
from labkit.efficientvlm import distill
from labkit.efficientvlm import exercises as efficient_checks
from labkit.efficientvlm import prune as efficient
from labkit.exercises import Status
from labkit.exercises.build import _clean, all_specs, build_all
from labkit.masking import exercises as masking_checks
from labkit.masking import masks as masking
from labkit.masking.bench import amdahl_ideal
from labkit.tipadapter import cache as tipadapter
from labkit.tipadapter import exercises as tip_checks

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "notebooks" / "exercises"
CHECK_MODULES = (masking_checks, qformer_checks, efficient_checks, tip_checks)
TASKS = [(spec, task) for spec in all_specs() for task in spec.tasks]


def check_for(name: str):
    return next(getattr(m, f"check_{name}") for m in CHECK_MODULES if hasattr(m, f"check_{name}"))


def notebook_function(spec, task, solved: bool):
    """The function a notebook defines: its imports cell, then the stub or solution cell."""
    namespace = {}
    exec(_clean(spec.imports), namespace)
    exec(task.function_cell(solved), namespace)
    return namespace[task.name]


# ---------------------------------------------------------------- known-wrong implementations

def _gather(tokens, keep):
    return tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _patches(images, p, permute=True):
    b, c, h, w = images.shape
    if not permute:
        return images.reshape(b, (h // p) * (w // p), -1)
    return images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)


def _cosine(x):
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(1, 2)


def _anchor_scores(patches, anchors, reduce="amax"):
    sim = patches[torch.arange(len(patches))[:, None], anchors] @ patches.transpose(1, 2)
    return getattr(sim, reduce)(dim=1)


def _mask_top(score, m, descending=True):
    order = score.argsort(dim=1, descending=descending)
    return torch.zeros_like(score, dtype=torch.bool).scatter(1, order[:, :m], True)


def _n_masked(score, ratio):
    return score.shape[1] - masking.num_keep(score.shape[1], ratio)


def _global_threshold(score, ratio):
    m = _n_masked(score, ratio) * len(score)
    flat = torch.zeros(score.numel(), dtype=torch.bool)
    flat[score.flatten().argsort(descending=True)[:m]] = True
    return flat.view_as(score)


def _itg_from_layout(n_query, text_mask, query_rows_see_text=False, causal_text=True, padding=True):
    batch, n_text = text_mask.shape
    length = n_query + n_text
    is_query = torch.arange(length) < n_query
    everything = torch.ones(length, length, dtype=torch.bool)
    text_part = everything.tril() if causal_text else everything
    layout = is_query[None, :] | (~is_query[:, None] & text_part) | (is_query[:, None] & query_rows_see_text)
    text_keys = text_mask.bool() if padding else torch.ones_like(text_mask, dtype=torch.bool)
    keys = torch.cat([torch.ones(batch, n_query, dtype=torch.bool), text_keys], 1)
    return layout[None, None] & keys[:, None, None, :]


def _classifier_by_wrong_axis(clip, names, templates):
    prompts = [t.format(c) for c in names for t in templates]  # class-major, then read as template-major
    return F.normalize(clip.encode_text(prompts).view(len(templates), len(names), -1).mean(0), dim=-1)


def _hard_concrete(log_alpha, u, beta=2 / 3, gamma=-0.1, zeta=1.1, stretch=True, clamp=True, sign=1):
    s = torch.sigmoid((sign * (torch.log(u) - torch.log(1 - u)) + log_alpha) / beta)
    z = s * (zeta - gamma) + gamma if stretch else s
    return z.clamp(0, 1) if clamp else z


WRONG = {
    "num_keep": [lambda n, r: max(1, round(n * (1 - r))), lambda n, r: int(n * (1 - r)), lambda n, r: max(1, int(n * r))],
    "random_keep_indices": [
        lambda b, n, r: torch.rand(1, n).expand(b, n).argsort(1)[:, :masking.num_keep(n, r)].sort(1).values,
        lambda b, n, r: torch.arange(masking.num_keep(n, r)).expand(b, -1),
        lambda b, n, r: torch.rand(b, n).argsort(1)[:, :masking.num_keep(n, r)],
        lambda b, n, r: torch.rand(b, n).argsort(1)[:, :min(n, masking.num_keep(n, r) + 1)].sort(1).values],
    "gather_kept_tokens": [
        lambda t, k: _gather(t[:, 1:], k),
        lambda t, k: torch.cat([t[:, :1], _gather(t, k)], 1),
        lambda t, k: torch.cat([t[:, :1], _gather(t[:, 1:], k[:1].expand_as(k))], 1)],
    "ideal_speedup": [
        lambda f, r, n: 1 / (f + (1 - f) * (1 - r)),  # the formula: 1 - r instead of the tokens that remain
        lambda f, r, n: 1 / (f + (1 - f) * masking.num_keep(n, r) / n),  # the CLS token forgotten
        lambda f, r, n: f + (1 - f) * masking.kept_token_fraction(n, r),  # time ratio, not a speedup
        lambda f, r, n: (n + 1) / (masking.num_keep(n, r) + 1)],  # the fixed share ignored
    "patch_similarity": [
        lambda x, p: _cosine(_patches(x.float(), p)),
        lambda x, p: (lambda v: _cosine(v - v.mean(-1, keepdim=True)))(_patches(x.float(), p, permute=False)),
        lambda x, p: (lambda c: c @ c.transpose(1, 2) / c.shape[-1])(
            (lambda v: (v - v.mean(-1, keepdim=True)) / v.std(-1, keepdim=True))(_patches(x.float(), p)))],
    "cluster_members": [
        lambda p, a, t: _anchor_scores(p, a) > t,
        lambda p, a, t: (_anchor_scores(p, a, "amin") > t).scatter(1, a, True),
        lambda p, a, t: ((p[0, a[0]] @ p.transpose(1, 2)).amax(1) > t).scatter(1, a, True)],
    "exact_ratio_mask": [
        _global_threshold,
        lambda s, r: _mask_top(s, _n_masked(s, r), descending=False),
        lambda s, r: _mask_top(s, masking.num_keep(s.shape[1], r))],
    "itc_similarity": [
        lambda q, t: torch.einsum("iqe,je->ij", q, t) / q.shape[1],
        lambda q, t: q[:, 0] @ t.T,
        lambda q, t: blip2.itc_similarity(q, t).T],
    "itg_attention_mask": [
        lambda q, m: _itg_from_layout(q, m, query_rows_see_text=True),
        lambda q, m: _itg_from_layout(q, m, causal_text=False),
        lambda q, m: _itg_from_layout(q, m, padding=False)],
    "sample_hard_negatives": [
        lambda s: torch.multinomial(s.softmax(1), 1).squeeze(1),
        lambda s: s.masked_fill(torch.eye(len(s), dtype=torch.bool), float("-inf")).argmax(1),
        lambda s: torch.multinomial((~torch.eye(len(s), dtype=torch.bool)).float(), 1).squeeze(1)],
    "hard_concrete_sample": [
        lambda la, u, **kw: _hard_concrete(la, u, clamp=False, **kw),
        lambda la, u, **kw: _hard_concrete(la, u, stretch=False, **kw),
        lambda la, u, **kw: _hard_concrete(la, u, sign=-1, **kw)],
    "expected_l0": [
        lambda la, beta=2 / 3, gamma=-0.1, zeta=1.1: torch.sigmoid(la),
        lambda la, beta=2 / 3, gamma=-0.1, zeta=1.1: torch.sigmoid(la + beta * torch.log(torch.tensor(-gamma / zeta)))],
    "layer_map": [
        lambda t, s: ([(i + 1) * (t // s) for i in range(s)], [i * (t // s) + t // s - 1 for i in range(s)]),
        lambda t, s: ([i * (t // s) for i in range(s + 1)], [i * (t // s) for i in range(s)])],
    "cache_logits": [
        lambda f, k, v, b: torch.exp(-b * (f @ k.T)) @ v,
        lambda f, k, v, b: torch.exp(-b * (1 - f @ k.T)),
        lambda f, k, v, b: b * torch.exp(-(1 - f @ k.T)) @ v],
    "tip_logits": [
        lambda f, w, k, v, a=1.0, b=1.0: tipadapter.tip_logits(f, w, k, v, b, a),
        lambda f, w, k, v, a=1.0, b=1.0: f @ w.T + a * tipadapter.cache_logits(f @ k.T, v, b),
        lambda f, w, k, v, a=1.0, b=1.0: a * 100 * f @ w.T + tipadapter.cache_logits(f @ k.T, v, b)],
    "zero_shot_classifier": [
        lambda clip, names, templates: torch.stack([clip.encode_text([t.format(c) for t in templates]).mean(0) for c in names]),
        _classifier_by_wrong_axis,
        lambda clip, names, templates: clip.encode_text([templates[0].format(c) for c in names])],
}

REFERENCES = {
    "num_keep": masking.num_keep,
    "random_keep_indices": masking.random_keep_indices,
    "ideal_speedup": lambda f, r, n: amdahl_ideal(f, masking.kept_token_fraction(n, r)),
    "patch_similarity": masking.similarity_matrix,
    "itc_similarity": blip2.itc_similarity,
    "itg_attention_mask": lambda q, m: qformer.attention_masks(q, m, "itg"),
    "sample_hard_negatives": blip2.sample_hard_negatives,
    "hard_concrete_sample": efficient.hard_concrete_sample,
    "expected_l0": efficient.expected_l0,
    "layer_map": distill.layer_map,
    "cache_logits": lambda f, k, v, b: tipadapter.cache_logits(tipadapter.affinity(f, k), v, b),
    "tip_logits": tipadapter.tip_logits,
    "zero_shot_classifier": zero_shot_classifier,
}


# ---------------------------------------------------------------- tests

def test_every_method_has_three_tasks_and_every_task_two_wrong_implementations():
    names = [spec.name for spec in all_specs()]
    assert names == ["ex_flip", "ex_cluster_masking", "ex_qformer", "ex_efficientvlm", "ex_tip_adapter"]
    assert all(len(spec.tasks) >= 3 for spec in all_specs())
    assert set(WRONG) == {task.name for _, task in TASKS}
    assert all(len(fns) >= 2 for fns in WRONG.values())


@pytest.mark.parametrize("spec,task", TASKS, ids=[task.name for _, task in TASKS])
def test_solution_passes_and_stub_is_not_attempted(spec, task):
    check = check_for(task.name)
    assert check(notebook_function(spec, task, solved=True)).status is Status.PASS
    stub = check(notebook_function(spec, task, solved=False))
    assert stub.status is Status.NOT_ATTEMPTED and not stub and stub.message.startswith("⏳ TODO: ")


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_labkit_reference_passes(name):
    assert check_for(name)(REFERENCES[name])


@pytest.mark.parametrize("name,index", [(n, i) for n, fns in WRONG.items() for i in range(len(fns))])
def test_known_wrong_implementation_fails_with_a_hint(name, index):
    result = check_for(name)(WRONG[name][index])
    assert result.status is Status.FAIL and not result
    assert result.message.startswith(f"❌ FAIL: {name}, case ") and " — hint: " in result.message


def test_a_crash_is_a_failure_not_an_exception_and_the_rng_is_left_alone():
    state = torch.get_rng_state()
    result = masking_checks.check_random_keep_indices(lambda b, n, r: 1 / 0)
    assert result.status is Status.FAIL and "ZeroDivisionError" in result.message
    assert torch.equal(state, torch.get_rng_state())


def test_committed_notebooks_are_what_the_specs_build(tmp_path):
    built = build_all(tmp_path)
    committed = sorted(p.relative_to(EXERCISES) for p in EXERCISES.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert committed == sorted(p.relative_to(tmp_path) for p in built)
    for path in built:
        assert (EXERCISES / path.relative_to(tmp_path)).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{path.relative_to(tmp_path)} is stale: run `python -m labkit.exercises.build`")


def test_notebooks_import_logic_only_from_labkit():
    allowed = {"math", "numpy", "torch", "matplotlib", "labkit"}
    for spec in all_specs():
        tree = ast.parse(_clean(spec.imports))
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert {m.split(".")[0] for m in modules} <= allowed, spec.name


def test_each_speedup_slip_gets_its_own_hint():
    hints = {masking_checks.check_ideal_speedup(wrong).message.split(" — hint: ")[1] for wrong in WRONG["ideal_speedup"]}
    assert len(hints) == len(WRONG["ideal_speedup"]) == 4


def test_check_lines_carry_a_word_as_well_as_a_symbol():
    """Without an emoji font the symbol is an empty box: PASS / FAIL / TODO must still be read."""
    def stub(n_patches, ratio):
        raise NotImplementedError

    check = check_for("num_keep")
    assert check(lambda n, r: max(1, int(n * (1 - r)))).message.startswith("✅ PASS: num_keep")
    assert check(lambda n, r: int(n * r)).message.startswith("❌ FAIL: num_keep")
    assert check(stub).message.startswith("⏳ TODO: num_keep")
