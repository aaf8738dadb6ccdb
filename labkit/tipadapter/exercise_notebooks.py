"""Exercise spec: Tip-Adapter's zero-shot classifier, cache logits and fusion (Zhang et al., ECCV 2022, §3)."""

from __future__ import annotations

from labkit.exercises.build import ExerciseNotebook, Task

ZERO_SHOT = Task(
    name="zero_shot_classifier",
    title="The zero-shot classifier, with template ensembling",
    explanation="""
        Tip-Adapter starts from zero-shot CLIP (§3): a class is represented by the text embedding of prompts such
        as "a picture of a {}". CLIP's *prompt ensembling* (CLIP, Radford et al. 2021, §3.1.4) fills several
        templates with the class name, encodes each prompt, averages the (unit) embeddings of one class, and
        renormalises. The rows form `W_c` `[C, D]`, and `100 · f · W_cᵀ` are the zero-shot logits of a unit image
        feature `f`.

        Write `zero_shot_classifier(clip, classnames, templates)`. `clip.encode_text(list_of_strings)` returns
        unit text features `[n, D]`; templates contain `{}` where the class name goes.
    """,
    signature='''
        def zero_shot_classifier(clip, classnames, templates) -> torch.Tensor:
            """``W_c`` ``[C, D]``: per class, encode every template filled with its name, average, renormalise."""
    ''',
    solution="""
        rows = []
        for name in classnames:
            prompts = clip.encode_text([template.format(name) for template in templates])  # [T, D], unit rows
            rows.append(F.normalize(prompts.mean(dim=0), dim=-1))
        return torch.stack(rows)
    """,
    plot="""
        accuracy = {f"{t!r} alone": tip.accuracy(COLOR_FEATS @ zero_shot_classifier(clip, COLOR_NAMES, (t,)).T, COLOR_LABELS)
                    for t in COLOR_TEMPLATES}
        accuracy["ensemble of all"] = tip.accuracy(COLOR_FEATS @ zero_shot_classifier(clip, COLOR_NAMES, COLOR_TEMPLATES).T,
                                                   COLOR_LABELS)
        plt.barh(list(accuracy), list(accuracy.values()), color=["tab:gray"] * len(COLOR_TEMPLATES) + ["tab:green"])
        plt.xlabel(f"zero-shot colour accuracy, {len(COLOR_LABELS)} ToyWorld scenes"); plt.xlim(0.8, 1)
        plt.title("no single template is best everywhere; the ensemble needs no choice"); plt.show()
    """,
)


CACHE = Task(
    name="cache_logits",
    title="The cache model's vote",
    explanation="""
        The cache (§3) stores the few-shot training set: **keys** `F_train` `[N·K, D]` are the unit CLIP features of
        the `K` support images of each of the `N` classes (labkit averages them over 10 augmented views), **values**
        `L_train` `[N·K, N]` their one-hot labels. A test feature `f` votes through the affinities

        `A = exp(−beta · (1 − f · F_trainᵀ))`,  cache logits `= A · L_train`

        `1 − cosine` is a distance, so an identical key adds exactly 1 to its class and a far one adds almost 0;
        `beta` sets how sharply the vote falls off. Write `cache_logits(features, keys, values, beta)`.
    """,
    signature='''
        def cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
            """``[B, C]`` votes of unit ``features`` ``[B, D]`` through ``keys`` ``[M, D]`` and one-hot ``values`` ``[M, C]``."""
    ''',
    solution="""
        affinity = features @ keys.T  # [B, M] cosine similarities
        return torch.exp(-beta * (1 - affinity)) @ values
    """,
    plot="""
        betas = [0.5, 1, 2, 3, 5, 7, 10]
        plt.plot(betas, [tip.accuracy(cache_logits(NOVEL_FEATS, CACHE.keys, CACHE.values, b), NOVEL_LABELS) for b in betas],
                 "o-", label=f"cache alone ({SHOTS} shots)")
        plt.axhline(tip.accuracy(100 * NOVEL_FEATS @ NOVEL_CLASSIFIER.T, NOVEL_LABELS), color="tab:gray", ls="--",
                    label="zero-shot CLIP")
        plt.xlabel("beta"); plt.ylabel("accuracy"); plt.ylim(0, 1)
        plt.title(f"novel shapes {CACHE.classnames}: never named in pretraining"); plt.legend(); plt.show()
    """,
)


FUSION = Task(
    name="tip_logits",
    title="Fusing the cache with zero-shot CLIP",
    explanation="""
        Tip-Adapter's prediction adds the cache's vote to zero-shot CLIP (§3):

        `logits = 100 · f · W_cᵀ + alpha · exp(−beta · (1 − f · F_trainᵀ)) · L_train`

        **alpha** weighs the cache (larger when the target domain is far from CLIP's pretraining data), **beta**
        sharpens its affinities. (The official repository once had the two swapped.) Both are chosen on a
        *validation* split, never on the test set (`labkit.tipadapter.search_alpha_beta`). Write `tip_logits`;
        you may reuse your `cache_logits`.
    """,
    signature='''
        def tip_logits(features: torch.Tensor, classifier: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
            """Tip-Adapter's fused logits ``[B, C]``: zero-shot CLIP plus ``alpha`` times the cache's vote."""
    ''',
    solution="""
        zero_shot = 100 * features @ classifier.T
        cache = torch.exp(-beta * (1 - features @ keys.T)) @ values
        return zero_shot + alpha * cache
    """,
    plot="""
        alphas = [0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200]
        for beta in (1.0, 5.0):
            acc = [tip.accuracy(tip_logits(VAL_FEATS, NOVEL_CLASSIFIER, CACHE.keys, CACHE.values, a, beta), VAL_LABELS)
                   for a in alphas]
            plt.plot(alphas, acc, "o-", label=f"beta = {beta:g}")
        plt.xscale("symlog", linthresh=0.5); plt.xlabel("alpha (0 = zero-shot CLIP)"); plt.ylabel("validation accuracy")
        plt.ylim(0, 1); plt.title("novel shapes: how much to trust the cache"); plt.legend(); plt.show()
    """,
)


NOTEBOOK = ExerciseNotebook(
    name="ex_tip_adapter",
    source=__name__,
    title="Exercise · Tip-Adapter: a training-free few-shot cache",
    intro="""
        **Tip-Adapter** (Zhang et al., *Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification*,
        ECCV 2022) adapts CLIP to a new task from a few labelled images without training: it stores them in a
        key-value cache and adds the cache's vote to zero-shot CLIP. You will write the zero-shot classifier,
        the cache logits and the fused logits; the references are `labkit.clip.zero_shot_classifier` and
        `labkit.tipadapter` (notebook `05_tip_adapter.ipynb`, and the web demo `labkit app`). The plots use the
        shipped toy CLIP on ToyWorld.
    """,
    imports="""
        import torch
        import torch.nn.functional as F
        from matplotlib import pyplot as plt

        from labkit.tipadapter import eval as tip_eval
        from labkit.tipadapter import cache as tip
        from labkit.clip.eval import zero_shot_classifier as zero_shot_classifier_reference
        from labkit.core.train import fast_mode
        from labkit.tipadapter import exercises as checks
        from labkit.clip.model import load_clip
    """,
    setup="""
        FAST = fast_mode()  # LABKIT_FAST=1: fewer scenes and views
        N_TEST, N_VIEWS, SHOTS = (150, 2, 4) if FAST else (600, 10, 8)
        torch.manual_seed(0)
        clip = load_clip("toy")
        color_images, COLOR_LABELS, COLOR_NAMES, COLOR_TEMPLATES = tip_eval.task_data("color", "test", N_TEST)
        COLOR_FEATS = clip.encode_image(color_images)
        support, support_labels, novel_names, novel_templates = tip_eval.task_data("novel", "support", 100)
        shots = tip.select_shots(support_labels, SHOTS, len(novel_names))
        CACHE = tip.build_cache(clip, support[shots], support_labels[shots], novel_names, n_views=N_VIEWS)
        NOVEL_CLASSIFIER = zero_shot_classifier_reference(clip, novel_names, novel_templates)
        novel_images, NOVEL_LABELS, _, _ = tip_eval.task_data("novel", "test", N_TEST)
        NOVEL_FEATS = clip.encode_image(novel_images)
        val_images, VAL_LABELS, _, _ = tip_eval.task_data("novel", "val", N_TEST)
        VAL_FEATS = clip.encode_image(val_images)
        print(f"cache: keys {list(CACHE.keys.shape)}, values {list(CACHE.values.shape)}; {N_TEST} test and val scenes")
    """,
    tasks=(ZERO_SHOT, CACHE, FUSION),
    outro="""
        ## Beyond training-free

        **Tip-Adapter-F** (§3) makes the keys a trainable layer initialised from the cache and fine-tunes only them
        (AdamW, lr 1e-3, 20 epochs): `labkit.tipadapter.finetune_keys`. `labkit eval tip --json` compares zero-shot,
        Tip-Adapter, Tip-Adapter-F and a linear probe from 1 to 16 shots; on the novel shapes the cache takes the
        toy CLIP from 0.20 to 0.94 with no training (README).
    """,
)


NOTEBOOKS = (NOTEBOOK,)
