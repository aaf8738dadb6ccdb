"""Exercise spec: BLIP-2's Q-Former stage-1 objectives (Li et al., ICML 2023, §3.2, Figure 2)."""

from __future__ import annotations

from labkit.exercises.build import ExerciseNotebook, Task

ITC = Task(
    name="itc_similarity",
    title="ITC: the best query speaks for the image",
    explanation="""
        Image-text contrastive learning (§3.2, ITC) aligns the Q-Former's query outputs `Z` with the text's
        [CLS] output `t`. An image has `Q` query embeddings (32 in BLIP-2, 16 here), a text one. In the paper's
        words: "we first compute the pairwise similarity between each query output and `t`, and then select the
        highest one as the image-text similarity".

        Write `itc_similarity(query_emb, text_emb)`: unit vectors `[B_img, Q, E]` and `[B_txt, E]` in, the
        `[B_img, B_txt]` similarity out (rows are images). `B_img` and `B_txt` may differ.
    """,
    signature='''
        def itc_similarity(query_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
            """``[B_img, B_txt]`` similarity from unit query embeddings ``[B_img, Q, E]`` and text embeddings ``[B_txt, E]``."""
    ''',
    solution="""
        per_query = query_emb @ text_emb.T  # [B_img, Q, B_txt]: every query against every text
        return per_query.amax(dim=1)
    """,
    plot="""
        sim = itc_similarity(QUERY_EMB, TEXT_EMB)
        hits = int((sim.argmax(dim=1) == torch.arange(len(sim))).sum())
        plt.figure(figsize=(9, 4.5)); plt.imshow(sim, cmap="viridis"); plt.colorbar()
        plt.yticks(range(len(CAPTIONS)), [f"image {i}" for i in range(len(CAPTIONS))], fontsize=8)
        plt.xticks(range(len(CAPTIONS)), CAPTIONS, rotation=60, ha="right", fontsize=7)
        plt.title(f"shipped stage-1 Q-Former: the right caption wins for {hits} of {len(sim)} images"); plt.show()
    """,
)


ITG_MASK = Task(
    name="itg_attention_mask",
    title="ITG: the multimodal causal mask",
    explanation="""
        The three stage-1 objectives share one Q-Former and differ only in the self-attention mask (Figure 2).
        For image-grounded text generation (ITG) the mask is *multimodal causal*: the queries attend to each
        other but never to the text, so everything the text needs from the image must pass through them; each
        text token attends to every query and to the text up to and including itself. Padded text positions are
        never attended to.

        Write `itg_attention_mask(n_query, text_attention_mask)`. Input: `text_attention_mask` `[B, T]` (True
        or 1 for real tokens). Output: boolean `[B, 1, Q+T, Q+T]`, queries first, rows attend to columns, True
        = may attend (the size-1 axis broadcasts over heads).
    """,
    signature='''
        def itg_attention_mask(n_query: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
            """Bool ``[B, 1, Q+T, Q+T]`` (row may attend to column), queries first; padded text is never attended to."""
    ''',
    solution="""
        batch, n_text = text_attention_mask.shape
        device = text_attention_mask.device
        length = n_query + n_text
        is_query = torch.arange(length, device=device) < n_query
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        layout = is_query[None, :] | (~is_query[:, None] & causal)  # everyone sees the queries; text also sees earlier text
        not_padded = torch.cat([torch.ones(batch, n_query, dtype=torch.bool, device=device),
                                text_attention_mask.bool()], dim=1)
        return layout[None, None] & not_padded[:, None, None, :]
    """,
    plot="""
        ids = TOKENIZER(["a red star at the top"], context_length=8)
        words = [TOKENIZER.words[i] if i else "pad" for i in ids[0].tolist()]
        masks = {"itc": attention_masks(4, ids != 0, "itc")[0, 0], "itm": attention_masks(4, ids != 0, "itm")[0, 0],
                 "itg (yours)": itg_attention_mask(4, ids != 0)[0, 0]}
        viz.show_mask_layouts(masks, n_query=4, tokens=words); plt.show()
    """,
)


HARD_NEGATIVES = Task(
    name="sample_hard_negatives",
    title="ITM: hard negatives, never the positive",
    explanation="""
        Image-text matching (§3.2, ITM) is a binary classifier: does this text describe this image? Random
        negatives are too easy, so BLIP-2 adopts the hard negative mining of ALBEF/BLIP: for each image, one
        negative text is *sampled* with probability `softmax(similarity)` over the batch, so similar texts are
        picked more often, and the positive (the diagonal) is never picked (likewise one negative image per text).

        Write `sample_hard_negatives(logits)`: a square `[B, B]` matrix in (row = image, column = text, the
        matching pairs on the diagonal), one column index per row out, drawn with `torch.multinomial`. Careful when
        the positive dominates a row: after training its similarity is far above the others'.
    """,
    signature='''
        def sample_hard_negatives(logits: torch.Tensor) -> torch.Tensor:
            """One column per row of ``logits`` ``[B, B]``, drawn from softmax(row) with the diagonal (the positive) ruled out."""
    ''',
    solution="""
        positive = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        probs = logits.float().masked_fill(positive, float("-inf")).softmax(dim=1)
        return torch.multinomial(probs, 1).squeeze(1)
    """,
    plot="""
        logits = itc_similarity_reference(QUERY_EMB, TEXT_EMB) / TEMPERATURE
        picks = torch.stack([sample_hard_negatives(logits) for _ in range(300)])  # [draws, B]
        freq = torch.zeros_like(logits).scatter_add_(1, picks.T, torch.ones_like(picks.T, dtype=logits.dtype)) / len(picks)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, m, title in ((axes[0], logits, "similarity / temperature (positives on the diagonal)"),
                             (axes[1], freq, "how often each text was drawn as a negative")):
            ax.imshow(m, cmap="magma"); ax.set_title(title, fontsize=9); ax.set_xlabel("text"); ax.set_ylabel("image")
        plt.show()
        i = int(freq.max(dim=1).values.argmax())
        print(f"image {i}: {CAPTIONS[i]!r}\\n  its most frequent hard negative: {CAPTIONS[int(freq[i].argmax())]!r}")
    """,
)


NOTEBOOK = ExerciseNotebook(
    name="ex_qformer",
    source=__name__,
    title="Exercise · BLIP-2 Q-Former: the stage-1 objectives",
    intro="""
        **BLIP-2** (Li, Li, Savarese, Hoi, ICML 2023) bridges a frozen image encoder and a frozen language model
        with a small **Q-Former**: learned queries read the image through cross-attention, and share
        self-attention with the text. Stage 1 trains it with three objectives at once (ITC, ITM, ITG; §3.2,
        Figure 2). You will write the ITC similarity, the ITG attention mask and ITM's hard-negative sampling;
        the references are `labkit.blip2` and `labkit.blip2.qformer.attention_masks` (notebook `03_blip2_qformer.ipynb`).
        The plots use the shipped stage-1 Q-Former on the toy CLIP's frozen features.
    """,
    imports="""
        import torch
        from matplotlib import pyplot as plt

        from labkit.blip2 import data as bd
        from labkit.blip2 import eval as be
        from labkit.blip2 import train as bt
        from labkit.blip2 import viz
        from labkit.blip2.stage1 import itc_similarity as itc_similarity_reference
        from labkit.blip2 import exercises as checks
        from labkit.blip2.qformer import attention_masks
    """,
    setup="""
        torch.manual_seed(0)
        encoder, stage1 = bd.load_encoder("toy"), bt.load_stage1()  # frozen toy CLIP features, shipped stage-1 Q-Former
        TOKENIZER = bd.tokenizer()
        scenes = be.eval_scenes(8, seed=3, objects=(2, 3))
        CAPTIONS = [s.caption() for s in scenes]
        ids = TOKENIZER(CAPTIONS)
        with torch.no_grad():
            QUERY_EMB = stage1.image_embeddings(encoder(bd.render(scenes)))  # [8, 16, 128], unit vectors
            TEXT_EMB = stage1.text_embeddings(ids, ids != 0)  # [8, 128]
        TEMPERATURE = float(stage1.temp.detach())
        print("query embeddings", list(QUERY_EMB.shape), "| text embeddings", list(TEXT_EMB.shape))
    """,
    tasks=(ITC, ITG_MASK, HARD_NEGATIVES),
    outro="""
        ## Putting the three together

        `labkit.blip2.Blip2Stage1.forward` runs ITC with the uni-modal mask, ITM on the positives plus one hard
        negative text per image and one hard negative image per text (bi-directional mask), and ITG with [DEC]
        as the first token (your causal mask), and sums the three losses. `labkit train qformer --stage 1`
        trains it; `labkit eval qformer --json` reports ITC retrieval and the stage-2 captioning and VQA.
    """,
)


NOTEBOOKS = (NOTEBOOK,)
