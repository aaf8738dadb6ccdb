"""Exercise spec: Cluster Masking (Wei, Pan & Owens, CVPR 2024, §3)."""

from ..build import ExerciseNotebook, Task

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

NOTEBOOK = ExerciseNotebook(
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

        from labkit import masking, toyworld as tw, viz_masking as viz
        from labkit.exercises import cluster as checks
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
