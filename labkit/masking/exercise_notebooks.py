"""Exercise specs: FLIP's random patch masking (Li et al., CVPR 2023, §3) and Cluster Masking (Wei, Pan &
Owens, CVPR 2024, §3.1); ``NOTEBOOKS`` is what ``python -m labkit.exercises.build`` writes.
"""

from __future__ import annotations

from labkit.exercises.build import ExerciseNotebook, Task

NUM_KEEP = Task(
    name="num_keep",
    title="How many patches survive?",
    explanation="""
        FLIP (§3, *Image masking*) "randomly masks out image patches with a high masking ratio" and encodes
        only the visible ones. With `N` patch tokens and mask ratio `r`, every image keeps the same number
        `K = int(N·(1−r))` of patches, so the batch stays rectangular. open_clip's `PatchDropout`, the hook
        FLIP-style masking uses, adds one guard: at least one patch is kept, however high the ratio.

        Write `num_keep(n_patches, ratio)`. Think about ratio 0, and about a tiny `N` with a ratio near 1.
    """,
    signature='''
        def num_keep(n_patches: int, ratio: float) -> int:
            """How many of the ``n_patches`` patch tokens an image keeps at mask ratio ``ratio`` in [0, 1)."""
    ''',
    solution="""
        return max(1, int(n_patches * (1 - ratio)))
    """,
    plot="""
        ratios = [0.0, 0.25, 0.5, 0.75, 0.9]
        for n in (49, 64, 196):
            plt.plot(ratios, [n / num_keep(n, r) for r in ratios], "o-", label=f"N = {n} patches")
        plt.xlabel("mask ratio r"); plt.ylabel("N / K: ideal speedup of the image encoder")
        plt.title("fewer tokens, cheaper steps"); plt.legend(); plt.show()
    """,
)


RANDOM_KEEP = Task(
    name="random_keep_indices",
    title="Random keep indices, per image",
    explanation="""
        FLIP samples a new random mask for every image of every step (§3, following MAE's random masking):
        draw uniform noise over the `N` patches of each image and keep the `K` patches with the lowest noise.
        Return their indices sorted ascending, so the kept patches stay in raster order: `[batch, K]`, the same
        `K` for every image. Draw the noise with `torch` (the check fixes the seed).

        You may call `masking.num_keep` (labkit's version of task 1).
    """,
    signature='''
        def random_keep_indices(batch: int, n_patches: int, ratio: float) -> torch.Tensor:
            """Sorted indices ``[batch, K]`` of the patches each image keeps, drawn independently per image."""
    ''',
    solution="""
        k = masking.num_keep(n_patches, ratio)
        noise = torch.rand(batch, n_patches)
        return noise.argsort(dim=1)[:, :k].sort(dim=1).values
    """,
    plot="""
        masks = {f"random {r}": masking.keep_to_mask(random_keep_indices(len(TOY), 64, r), 64) for r in (0.5, 0.75)}
        viz.masks_grid_figure(TOY, masks, PATCH); plt.show()
    """,
)


GATHER = Task(
    name="gather_kept_tokens",
    title="Gather the kept tokens, CLS first",
    explanation="""
        Where does the mask act? After the patch embedding **and the positional embedding** (every kept token
        still knows where it came from) and before the transformer blocks: open_clip's
        `VisionTransformer` prepends the CLS token, adds positions, then calls `patch_dropout`. The CLS token
        is never dropped. Input: `tokens` `[B, 1+N, D]` (CLS at position 0) and `keep` `[B, K]` (indices into
        the `N` patches, *not* counting CLS). Output: `[B, 1+K, D]`, CLS first, then the kept patches in the
        order of `keep`. No Python loop over the batch: look at `torch.gather`.
    """,
    signature='''
        def gather_kept_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            """``tokens`` ``[B, 1+N, D]`` (CLS first) and ``keep`` ``[B, K]`` -> ``[B, 1+K, D]``: CLS, then the kept patches."""
    ''',
    solution="""
        cls, patches = tokens[:, :1], tokens[:, 1:]
        index = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return torch.cat([cls, patches.gather(1, index)], dim=1)
    """,
    plot="""
        # Use pixel patches as the "tokens" to see exactly what the encoder receives at ratio 0.75.
        pixels = masking.patchify(TOY.float() / 255, PATCH)  # [B, 64, 3*8*8]
        tokens = torch.cat([torch.zeros_like(pixels[:, :1]), pixels], dim=1)  # a blank CLS token first
        keep = masking.random_keep_indices(len(TOY), 64, 0.75)
        seen = gather_kept_tokens(tokens, keep)
        print(f"tokens {list(tokens.shape)} -> encoder input {list(seen.shape)}")
        fig, axes = plt.subplots(2, len(TOY), figsize=(2.6 * len(TOY), 5.4))
        for i in range(len(TOY)):
            viz.draw_mask(axes[0, i], TOY[i], masking.keep_to_mask(keep, 64)[i], PATCH)
            tiles = seen[i, 1:].view(4, 4, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2).reshape(4 * PATCH, 4 * PATCH, 3)
            axes[1, i].imshow(tiles.numpy()); axes[1, i].set_title("the 16 kept tokens", fontsize=9); axes[1, i].axis("off")
        plt.show()
    """,
)


IDEAL_SPEEDUP = Task(
    name="ideal_speedup",
    title="What speedup can masking buy?",
    explanation="""
        Dropping 75 % of the patches does not make a training step 4× faster. Amdahl's law says why: a share
        `f` of the step runs *before* the mask and never shrinks (the patch embedding, or the toy CLIP's
        convolutional stem), and the rest shrinks only with the share of tokens the transformer blocks still
        see. Count those carefully: the CLS token is never dropped, and `K` is rounded down, so ViT-B-32
        (49 patches) at r = 0.75 keeps 13 of its 50 tokens, not a quarter of them.

        Write `ideal_speedup(fixed_share, ratio, n_patches)`: the step time without masking divided by the step
        time with it, if the part after the mask shrank exactly with its tokens. You may call `masking.num_keep`.
    """,
    signature='''
        def ideal_speedup(fixed_share: float, ratio: float, n_patches: int) -> float:
            """Amdahl's ideal speedup of a training step at mask ratio ``ratio`` when ``fixed_share`` of it never shrinks."""
    ''',
    solution="""
        kept = (masking.num_keep(n_patches, ratio) + 1) / (n_patches + 1)
        return 1 / (fixed_share + (1 - fixed_share) * kept)
    """,
    plot="""
        # Measure the toy vision tower's training step (forward, backward, AdamW) at ratios 0, 0.5, 0.75 (about 20 s).
        toy = bench_masking(models=("toy",), strategies=("random",))["models"][0]
        f = toy["f_stem"]  # the measured share of the step spent in the stem, before the mask
        ratios = np.linspace(0, 0.9, 361)  # fine enough to show the steps of K's rounding
        plt.plot(ratios, 1 / (1 - ratios), "k:", label="1 / (1 - r), the naive ideal")
        plt.plot(ratios, [ideal_speedup(f, r, 64) for r in ratios], label=f"your ideal_speedup, f = {f:.2f} (measured)")
        plt.plot([r["ratio"] for r in toy["rows"]], [r["speedup"] for r in toy["rows"]], "o", label="measured on this machine")
        plt.xlabel("mask ratio r"); plt.ylabel("training-step speedup"); plt.title("toy ViT, random masking")
        plt.legend(); plt.show()
    """,
)


FLIP_NOTEBOOK = ExerciseNotebook(
    name="ex_flip",
    source=__name__,
    title="Exercise · FLIP: random patch masking",
    intro="""
        **FLIP** (Li, Fan, Hu, Feichtenhofer, He, *Scaling Language-Image Pre-training via Masking*, CVPR 2023)
        trains CLIP on a random subset of each image's patches: fewer tokens per image, cheaper steps, more
        image–text pairs for the same compute. You will write the three pieces of the masking step and the
        speedup they can buy at best; the reference is `labkit.masking` (notebook `01_flip.ipynb` tells the
        whole story).
    """,
    imports="""
        import numpy as np
        import torch
        from matplotlib import pyplot as plt

        from labkit.masking import masks as masking
        from labkit.data import toyworld as tw
        from labkit.masking import viz
        from labkit.masking import exercises as checks
        from labkit.masking.bench import bench_masking
    """,
    setup="""
        world = tw.ToyWorld("test", seed=0, size=4)
        TOY = torch.from_numpy(np.stack([world.scene(i).render() for i in range(4)])).permute(0, 3, 1, 2)  # uint8 [4, 3, 64, 64]
        PATCH = 8  # the toy ViT cuts a 64 px scene into 8x8 = 64 patches of 8 px
        torch.manual_seed(0);
    """,
    tasks=(NUM_KEEP, RANDOM_KEEP, GATHER, IDEAL_SPEEDUP),
    outro="""
        ## What the speedup really is

        On the toy ViT the measured points can sit *above* your curve, since the formula assumes the rest of the
        step shrinks in proportion to the tokens. Two likely reasons it shrinks faster: attention grows with the
        *square* of the tokens (about 8 % of the toy's block FLOPs at 65 tokens and width 128), and a quarter of
        the activations fits the CPU's caches better. On ViT-B-32 (50 tokens, width 768) the matrix products
        dominate and the measured speedup lands just under the ideal: the README's `labkit bench masking --json`
        table shows both, with `f` measured. FLIP itself reports 3.7× less wall-clock time for ViT-L/16 CLIP training, at
        similar or better accuracy.
    """,
)


SIMILARITY = Task(
    name="patch_similarity",
    title="Normalised patches and their cosine similarity",
    explanation="""
        Cluster Masking (§3) groups patches by how alike they *look*: each patch's raw pixels are flattened to
        one `C·p·p` vector, normalised per patch (subtract its mean, divide by its standard deviation, as in
        MAE's normalised pixel targets) and compared by cosine similarity. Normalisation removes brightness and
        contrast, so a shadowed and a lit part of the same texture still match.

        Write `patch_similarity(images, patch_size)` returning `[B, N, N]`, patches in raster order (row by
        row, like a ViT's tokens). Edge case: a perfectly flat grey patch has zero spread; give it a zero vector
        (similarity 0 to everything) instead of dividing by zero.
    """,
    signature='''
        def patch_similarity(images: torch.Tensor, patch_size: int) -> torch.Tensor:
            """``[B, N, N]`` cosine similarity of the per-patch normalised pixel vectors of ``images`` ``[B, C, H, W]``."""
    ''',
    solution="""
        b, c, h, w = images.shape
        p = patch_size
        patches = images.float().reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        centred = patches - patches.mean(dim=-1, keepdim=True)
        std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
        normalised = torch.where(std > 1e-6, centred / std.clamp_min(1e-6), torch.zeros_like(centred))
        unit = F.normalize(normalised, dim=-1)
        return unit @ unit.transpose(1, 2)
    """,
    plot="""
        sim = patch_similarity(TOY[:1], PATCH)[0]
        probe = 27  # a patch near the middle
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        viz.draw_patch_grid(axes[0], TOY[0], PATCH)
        viz.draw_similarity_matrix(axes[1], sim)
        viz.draw_anchor_similarity(axes[2], TOY[0], sim[probe], [probe], PATCH, title=f"similarity to patch {probe}")
        plt.show()
    """,
)


MEMBERS = Task(
    name="cluster_members",
    title="Clusters around random anchors",
    explanation="""
        Per image, a few random **anchor** patches are drawn (3% of the patches in the paper; at least one), and
        every patch whose similarity to *any* anchor of its own image exceeds a threshold (0.68 in the official
        code) joins the clusters; an anchor always belongs to its own cluster. Masking whole clusters removes
        whole visual structures, which forces the model to rely on context (§3).

        Input: unit patch vectors `patches` `[B, N, D]` (from `masking.normalized_patches`), the anchors'
        indices `anchors` `[B, A]` and the threshold. Only the `A` anchor rows of the similarity matrix are
        needed. Output: a boolean `[B, N]`, True for cluster members.
    """,
    signature='''
        def cluster_members(patches: torch.Tensor, anchors: torch.Tensor, threshold: float) -> torch.Tensor:
            """Bool ``[B, N]``: the ``anchors`` ``[B, A]`` and every patch above ``threshold`` in similarity to one of them."""
    ''',
    solution="""
        rows = torch.arange(patches.shape[0], device=patches.device)[:, None]
        anchor_vectors = patches[rows, anchors]  # [B, A, D]
        score = (anchor_vectors @ patches.transpose(1, 2)).amax(dim=1)  # [B, N]: similarity to the nearest anchor
        return (score > threshold).scatter(1, anchors, True)
    """,
    plot="""
        n = 64
        anchors = torch.rand(len(TOY), n).argsort(dim=1)[:, :masking.num_anchors(n, 0.05)]
        member = cluster_members(masking.normalized_patches(TOY, PATCH), anchors, masking.DEFAULT_THRESHOLD)
        fig, axes = plt.subplots(1, len(TOY), figsize=(3 * len(TOY), 3.2))
        for i, ax in enumerate(axes):
            viz.draw_mask(ax, TOY[i], member[i], PATCH, anchors=anchors[i], title=f"{int(member[i].sum())} of {n} in clusters")
        fig.suptitle("threshold 0.68: the masked share differs from image to image"); plt.show()
    """,
)


EXACT = Task(
    name="exact_ratio_mask",
    title="Hit the ratio exactly, per image",
    explanation="""
        With one global threshold the number of masked patches varies from image to image. The official code
        pads short masks and hides the padding with an additive attention mask (its threshold `search()` is
        never called), which wastes compute. labkit instead gives each image its own threshold: rank the
        patches by `score` (each patch's similarity to its nearest anchor; anchors score highest) and mask the
        top `M = N − num_keep(N, ratio)`. Every image then keeps exactly `K` patches and the batch stays
        rectangular, with no padding.

        Write `exact_ratio_mask(score, ratio)`: boolean `[B, N]`, True = masked. You may use `masking.num_keep`.
    """,
    signature='''
        def exact_ratio_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
            """Bool ``[B, N]``, True = masked: per image, the ``N - num_keep(N, ratio)`` patches with the highest ``score``."""
    ''',
    solution="""
        n = score.shape[1]
        n_masked = n - masking.num_keep(n, ratio)
        order = score.argsort(dim=1, descending=True)
        return torch.zeros_like(score, dtype=torch.bool).scatter(1, order[:, :n_masked], True)
    """,
    plot="""
        _, diag = masking.cluster_keep_indices(TOY, PATCH, 0.5, anchor_ratio=0.05, fill="similarity",
                                               return_diagnostics=True)
        masks = {"one threshold (0.68)": diag["member"], "exact ratio 0.5 (yours)": exact_ratio_mask(diag["score"], 0.5)}
        viz.masks_grid_figure(TOY, masks, PATCH); plt.show()
    """,
)


CLUSTER_NOTEBOOK = ExerciseNotebook(
    name="ex_cluster_masking",
    source=__name__,
    title="Exercise · Cluster Masking",
    intro="""
        **Cluster Masking** (Wei, Pan & Owens, *Efficient Vision-Language Pre-training by Cluster Masking*,
        CVPR 2024) masks *clusters* of similar patches instead of random ones, and reports better accuracy than
        FLIP at the same ratio. You will write its three steps: patch similarity, clusters around anchors, and a
        mask that meets the ratio exactly in every image. The reference is `labkit.masking.cluster_keep_indices`
        (notebook `02_cluster_masking.ipynb`).
    """,
    imports="""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from matplotlib import pyplot as plt

        from labkit.masking import masks as masking
        from labkit.data import toyworld as tw
        from labkit.masking import viz
        from labkit.masking import exercises as checks
    """,
    setup="""
        world = tw.ToyWorld("test", seed=0, size=4, objects=(2, 3))
        TOY = torch.from_numpy(np.stack([world.scene(i).render() for i in range(4)])).permute(0, 3, 1, 2).float() / 255
        PATCH = 8  # 8x8 = 64 patches of 8 px
        torch.manual_seed(0);
    """,
    tasks=(SIMILARITY, MEMBERS, EXACT),
    outro="""
        ## Where this goes next

        `masking.cluster_keep_indices` adds two things to your three steps: when clusters hold fewer than `M`
        patches it tops up with random patches (`fill="random"`, like the official code's random cut-off), and it
        can mix in the similarity of patch *embeddings* (`embed_weight`). `masking.install(model, "cluster", 0.5)`
        puts it into any open_clip ViT; `labkit eval masking --json` compares it with FLIP for the same training time.
    """,
)


NOTEBOOKS = (FLIP_NOTEBOOK, CLUSTER_NOTEBOOK)
