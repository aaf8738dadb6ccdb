"""Exercise spec: EfficientVLM's layer map and hard-concrete L0 gates (Wang et al., ACL Findings 2023, §3)."""

from __future__ import annotations

from labkit.exercises.build import ExerciseNotebook, Task

HARD_CONCRETE = Task(
    name="hard_concrete_sample",
    title="A hard-concrete gate",
    explanation="""
        EfficientVLM prunes attention heads and FFN units with **L0 gates** (§3.2), after Louizos et al.
        (*Learning Sparse Neural Networks through L0 Regularization*, ICLR 2018, §4). Each head or unit has a
        learnable `log_alpha`; its gate is a sample of the *hard concrete* distribution:

        `s = sigmoid((log u − log(1−u) + log_alpha) / beta)`,  `u ~ U(0, 1)`

        `z = clamp(s · (zeta − gamma) + gamma, 0, 1)`

        with `beta = 2/3`, `gamma = −0.1`, `zeta = 1.1`. Stretching `s` to `(gamma, zeta)` and clipping back to
        `[0, 1]` puts real probability mass on exactly 0 (pruned) and exactly 1 (kept), while staying
        differentiable in `log_alpha`. Write it with the noise `u` given (same shape as `log_alpha`).
    """,
    signature='''
        def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = 2 / 3, gamma: float = -0.1,
                                 zeta: float = 1.1) -> torch.Tensor:
            """A gate in [0, 1] per entry of ``log_alpha``, from uniform noise ``u`` of the same shape (Louizos et al., §4)."""
    ''',
    solution="""
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
        return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)
    """,
    plot="""
        u = torch.rand(20000).clamp(1e-6, 1 - 1e-6)
        fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
        for ax, la in zip(axes, (-2.0, 0.0, 2.0)):
            z = hard_concrete_sample(torch.full_like(u, la), u)
            ax.hist(z.numpy(), bins=40, color="tab:blue")
            ax.set_title(f"log_alpha = {la:g}: {float((z == 0).float().mean()):.0%} exactly 0, "
                         f"{float((z == 1).float().mean()):.0%} exactly 1", fontsize=9)
            ax.set_xlabel("gate z")
        plt.show()
    """,
)


EXPECTED_L0 = Task(
    name="expected_l0",
    title="The expected L0 norm",
    explanation="""
        Sampling is not differentiable in the *count* of open gates, but its expectation is. The probability
        that a gate is not exactly zero has a closed form (Louizos et al., eq. 12):

        `P(z ≠ 0) = sigmoid(log_alpha − beta · log(−gamma / zeta))`

        Summed over gates it is the expected number of heads/units kept; EfficientVLM weights each gate by the
        parameters it controls to get the expected sparsity, and drives that to a target with a Lagrangian
        (§3.2). Write `expected_l0`.
    """,
    signature='''
        def expected_l0(log_alpha: torch.Tensor, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1) -> torch.Tensor:
            """P(gate != 0) for each entry of ``log_alpha``: the differentiable L0 penalty (Louizos et al., eq. 12)."""
    ''',
    solution="""
        return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))
    """,
    plot="""
        grid = torch.linspace(-6, 6, 49)
        u = torch.rand(49, 4000).clamp(1e-6, 1 - 1e-6)
        sampled = (efficient.hard_concrete_sample(grid[:, None].expand_as(u), u) > 0).float().mean(1)
        plt.plot(grid, expected_l0(grid), label="expected_l0 (yours)")
        plt.plot(grid, sampled, ".", label="share of 4000 samples that are not 0")
        plt.plot(grid, torch.sigmoid(grid), ":", label="sigmoid(log_alpha), for comparison")
        plt.xlabel("log_alpha"); plt.ylabel("P(gate ≠ 0)"); plt.legend(); plt.show()
    """,
)


LAYER_MAP = Task(
    name="layer_map",
    title="Which teacher layer teaches which student layer",
    explanation="""
        Before pruning, EfficientVLM distils the teacher (X-VLM: 12 vision, 6 text, 6 fusion layers) into a
        student with half the layers of each encoder, initialised from teacher layers (§3.1). With `T` teacher
        and `S` student layers and `k = T / S`:

        * hidden states include the embedding output (state 0), so there are `S + 1` of them; student state `i`
          learns from teacher state `i·k`;
        * the attention of student layer `i` (0-based) learns from teacher layer `i·k + k − 1`, the last layer
          of its block of `k`.

        Write `layer_map(teacher_layers, student_layers)` returning `(hidden, attention)`: two lists of teacher
        indices. Assume `T` is a multiple of `S`.
    """,
    signature='''
        def layer_map(teacher_layers: int, student_layers: int) -> tuple[list[int], list[int]]:
            """Teacher indices for the student's ``S + 1`` hidden states and ``S`` attention maps."""
    ''',
    solution="""
        k = teacher_layers // student_layers
        hidden = [i * k for i in range(student_layers + 1)]
        attention = [i * k + k - 1 for i in range(student_layers)]
        return hidden, attention
    """,
    plot="""
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, (name, teacher, student) in zip(axes, (("vision", 12, 6), ("text / fusion", 6, 3))):
            hidden, attention = layer_map(teacher, student)
            for i, t in enumerate(hidden):
                ax.plot([0, 1], [t, i], "-", color="tab:blue", label="hidden state" if i == 0 else None)
            for i, t in enumerate(attention):
                ax.plot([0, 1], [t + 0.5, i + 0.5], "--", color="tab:red", label="attention map" if i == 0 else None)
            ax.set_xticks([0, 1], [f"teacher\\n{teacher} layers", f"student\\n{student} layers"])
            ax.set_ylabel("layer (hidden state 0 = embeddings)"); ax.set_title(name); ax.legend(fontsize=8)
        plt.show()
    """,
)


NOTEBOOK = ExerciseNotebook(
    name="ex_efficientvlm",
    source=__name__,
    title="Exercise · EfficientVLM: distillation map and L0 gates",
    intro="""
        **EfficientVLM** (Wang et al., *EfficientVLM: Fast and Accurate Vision-Language Models via Knowledge
        Distillation and Modal-adaptive Pruning*, ACL Findings 2023) compresses a vision-language model in two
        steps: distil it into a student with half the layers (§3.1), then prune heads and FFN units with learned
        hard-concrete L0 gates under one global sparsity target (§3.2). The paper keeps 44.3% of the teacher's
        parameters, 98.4% of its performance and runs 2.2× faster. You will write the gate sample, its expected
        L0 norm and the teacher-to-student layer map; the reference is `labkit.efficientvlm.prune`.
    """,
    imports="""
        import math

        import torch
        from matplotlib import pyplot as plt

        from labkit.efficientvlm import prune as efficient
        from labkit.efficientvlm import exercises as checks
    """,
    setup="""
        torch.manual_seed(0);
    """,
    tasks=(HARD_CONCRETE, EXPECTED_L0, LAYER_MAP),
    outro="""
        ## At the end of pruning

        Training samples gates; at test time each site keeps a deterministic 0/1 mask: the expected number of
        closed gates, `round(Σ (1 − P(z ≠ 0)))` from your `expected_l0`, is closed at the smallest log alpha and
        every other gate is 1 (`labkit.efficientvlm.prune.deterministic_mask`, as in the official code). Closed
        heads and units are removed for good, and the model becomes physically smaller and faster.
    """,
)


NOTEBOOKS = (NOTEBOOK,)
