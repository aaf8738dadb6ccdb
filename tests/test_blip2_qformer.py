"""Q-Former (BLIP-2 §3.1), its stage-1 masks and losses (§3.2), and the shared blocks of labkit.core.blocks."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from labkit.blip2.hf import load_hf_qformer, load_hf_stage1
from labkit.blip2.qformer import QFormer, QFormerConfig, attention_masks
from labkit.blip2.stage1 import Blip2Stage1, itc_similarity, sample_hard_negatives
from labkit.core.blocks import AttentionBlock, FeedForwardBlock, MultiHeadAttention

TOL = 1e-5


def _text(batch, length, vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


# --- equivalence with transformers' Blip2QFormerModel -------------------------------------------------

HF_CASES = {
    "every-layer-cross": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              encoder_hidden_size=24, cross_attention_frequency=1, num_queries=4),
    "every-other-cross": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=80,
                              encoder_hidden_size=40, cross_attention_frequency=2, num_queries=5),
}


def _hf_pair(case, text_input=True):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    kwargs = dict(HF_CASES[case])
    n_query = kwargs.pop("num_queries")
    cfg = Blip2QFormerConfig(vocab_size=40, max_position_embeddings=16, use_qformer_text_input=text_input, **kwargs)
    torch.manual_seed(0)
    hf = Blip2QFormerModel._from_config(cfg, attn_implementation="eager").eval()
    embeddings = Blip2TextEmbeddings(cfg).eval()
    query_tokens = torch.randn(1, n_query, cfg.hidden_size)
    with torch.no_grad():  # move every weight away from its init (LayerNorms included) for a stronger check
        for p in [*hf.parameters(), *embeddings.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    state = {**hf.state_dict(), **{f"embeddings.{k}": v for k, v in embeddings.state_dict().items()}}
    ours = QFormer(QFormerConfig.from_hf(cfg, num_queries=n_query)).eval()
    missing = load_hf_qformer(ours, state if text_input else hf.state_dict(), query_tokens)
    return hf, embeddings, query_tokens, ours, missing


def _record_hf_maps(hf):
    """Attention probabilities of every Blip2QFormerMultiHeadAttention, keyed by module name."""
    maps = {}
    for name, module in hf.named_modules():
        if type(module).__name__ == "Blip2QFormerMultiHeadAttention":
            module.register_forward_hook(lambda m, args, out, name=name: maps.__setitem__(name, out[1]))
    return maps


@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_transformers_blip2_qformer(case, record_property):
    hf, embeddings, query_tokens, ours, missing = _hf_pair(case)
    assert missing == []
    n_query, width = query_tokens.shape[1], hf.config.encoder_hidden_size
    feats = torch.randn(3, 7, width)
    ids, mask = _text(3, 6, 40, [6, 4, 2])
    queries = query_tokens.expand(3, -1, -1)
    hf_maps = _record_hf_maps(hf)
    with torch.no_grad():
        ref_q = hf(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state
        ref_qt = hf(query_embeds=embeddings(ids, query_embeds=queries), query_length=n_query,
                    attention_mask=torch.cat([torch.ones(3, n_query), mask.float()], 1),
                    encoder_hidden_states=feats).last_hidden_state
        maps_qt = dict(hf_maps)
        ref_t = hf(query_embeds=embeddings(ids), query_length=0, attention_mask=mask.float()).last_hidden_state
        out_q = ours(feats)
        out_qt = ours(feats, ids, mask, mode="itm", return_attention=True)  # explicit-softmax path
        out_qt_sdpa = ours(feats, ids, mask, mode="itm")  # scaled_dot_product_attention path
        out_t = ours(None, ids, mask, mode="text")
    diffs = {
        "queries": (out_q.query - ref_q).abs().max().item(),
        "queries+text": (torch.cat([out_qt.query, out_qt.text], 1) - ref_qt).abs().max().item(),
        "queries+text_sdpa": (torch.cat([out_qt_sdpa.query, out_qt_sdpa.text], 1) - ref_qt).abs().max().item(),
        "text": (out_t.text - ref_t).abs().max().item(),
    }
    for i in range(hf.config.num_hidden_layers):
        self_map = maps_qt[f"encoder.layer.{i}.attention.attention"]
        diffs[f"self_map_{i}"] = (out_qt.self_attentions[i] - self_map).abs().max().item()
        cross = maps_qt.get(f"encoder.layer.{i}.crossattention.attention")
        assert (cross is None) == (out_qt.cross_attentions[i] is None)
        if cross is not None:
            diffs[f"cross_map_{i}"] = (out_qt.cross_attentions[i] - cross).abs().max().item()
    record_property("max_abs_diff", diffs)
    print(case, diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_matches_transformers_blip2_retrieval_heads(record_property):
    """A whole BLIP-2 state dict (vision tower, qformer., embeddings., query_tokens, heads): same ITM and ITC scores."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8)
    qcfg = Blip2QFormerConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=16, encoder_hidden_size=24, use_qformer_text_input=True)
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qcfg.to_dict(), num_query_tokens=4,
                      image_text_hidden_size=16)
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = Blip2Stage1(QFormerConfig.from_hf(hf.config.qformer_config, num_queries=4), dec_token_id=39, embed_dim=16).eval()
    assert load_hf_stage1(ours, hf.state_dict()) == []
    pixels = torch.randn(3, 3, 16, 16)
    ids, mask = _text(3, 6, 40, [6, 3, 5], seed=1)
    with torch.no_grad():
        ref_itm = hf(pixels, ids, mask.long(), use_image_text_matching_head=True).logits_per_image
        ref_itc = hf(pixels, ids, mask.long()).logits_per_image
        feats = hf.vision_model(pixels).last_hidden_state
        itm = ours.itm_logits(feats, ids, mask)
        itc = itc_similarity(ours.image_embeddings(feats), ours.text_embeddings(ids, mask))
    diffs = {"itm_logits": (itm - ref_itm).abs().max().item(), "itc_similarity": (itc - ref_itc).abs().max().item()}
    record_property("max_abs_diff", diffs)
    print("retrieval", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_hf_checkpoint_without_text_input_loads_query_path():
    hf, _, query_tokens, ours, missing = _hf_pair("every-other-cross", text_input=False)
    assert missing and all(k.startswith(("word_", "position_")) or ".ffn_text." in k for k in missing)
    feats = torch.randn(2, 5, hf.config.encoder_hidden_size)
    with torch.no_grad():
        ref = hf(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=feats).last_hidden_state
        assert (ours(feats).query - ref).abs().max() <= TOL


def test_load_hf_rejects_mismatched_layout():
    hf, embeddings, query_tokens, _, _ = _hf_pair("every-layer-cross")
    cfg = QFormerConfig.from_hf(hf.config, num_queries=query_tokens.shape[1])
    fewer_cross = QFormer(QFormerConfig(**{**cfg.to_dict(), "cross_attention_frequency": 2}))
    with pytest.raises(ValueError, match="crossattention.*cross_attention_frequency=2"):
        load_hf_qformer(fewer_cross, hf.state_dict(), query_tokens)
    wider = QFormer(QFormerConfig(**{**cfg.to_dict(), "encoder_width": 99}))
    with pytest.raises(ValueError, match="checkpoint shape"):
        load_hf_qformer(wider, hf.state_dict(), query_tokens)
    with pytest.raises(ValueError, match="query_tokens"):
        load_hf_qformer(wider, hf.state_dict())


# --- attention-mask layouts ---------------------------------------------------------------------------

def test_attention_mask_layouts():
    n_query, lengths = 3, [5, 2]
    _, text_mask = _text(2, 5, 10, lengths)
    valid = torch.cat([torch.ones(2, n_query, dtype=torch.bool), text_mask], 1)[:, None, :]  # [B, 1, L] keys
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    masks = {mode: attention_masks(n_query, text_mask, mode) for mode in ("itc", "itm", "itg")}
    for mode, m in masks.items():
        assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
        assert not (m & ~valid[:, :, None, :]).any(), f"{mode}: padding attended"
    q, t = slice(0, n_query), slice(n_query, None)
    assert torch.equal(masks["itm"][:, 0], valid.expand(2, 8, 8))
    for mode in ("itc", "itg"):  # queries never see text
        assert not masks[mode][:, 0, q, t].any() and masks[mode][:, 0, q, q].all()
    assert not masks["itc"][:, 0, t, q].any()  # uni-modal: text never sees queries
    assert masks["itg"][:, 0, t, q].all()  # ITG: text sees every query
    assert torch.equal(masks["itg"][:, 0, t, t], causal & text_mask[:, None, :])
    assert torch.equal(masks["itc"][:, 0, t, t], text_mask[:, None, :].expand(2, 5, 5))


def test_masks_act_on_outputs():
    torch.manual_seed(0)
    qf = QFormer(QFormerConfig.tiny(hidden=32, heads=2, intermediate=64, layers=2, num_queries=4, encoder_width=16,
                                    vocab_size=30, max_positions=8)).eval()
    feats = torch.randn(2, 6, 16)
    ids, mask = _text(2, 6, 30, [6, 6])
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] % 29) + 1  # change only the last two tokens
    with torch.no_grad():
        itg, itg_later = qf(feats, ids, mask, mode="itg"), qf(feats, later, mask, mode="itg")
        itc, alone_q, alone_t = qf(feats, ids, mask, mode="itc"), qf(feats), qf(None, ids, mask, mode="text")
        itc_other_image = qf(torch.randn(2, 6, 16), ids, mask, mode="itc")
    assert torch.allclose(itg.query, itg_later.query, atol=1e-6)  # queries never see text
    assert torch.allclose(itg.text[:, :4], itg_later.text[:, :4], atol=1e-6)  # causal text
    assert torch.allclose(itc.query, alone_q.query, atol=1e-6)  # ITC = separate passes
    assert torch.allclose(itc.text, alone_t.text, atol=1e-6)
    assert torch.allclose(itc.text, itc_other_image.text, atol=1e-6)


# --- stage-1 losses -----------------------------------------------------------------------------------

def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=g) + 8 * torch.eye(6)  # the positive is by far the most similar
    exclude = torch.zeros(6, 6, dtype=torch.bool)
    exclude[0, 1] = exclude[2, 3] = True
    draws = torch.stack([sample_hard_negatives(logits, exclude=exclude, generator=g) for _ in range(2000)])
    rows = torch.arange(6).expand_as(draws)
    assert not (draws == rows).any()
    assert not (draws[:, 0] == 1).any() and not (draws[:, 2] == 3).any()
    # frequencies follow softmax over the remaining candidates
    probs = torch.softmax(logits.masked_fill(torch.eye(6, dtype=torch.bool) | exclude, float("-inf")), 1)
    freq = torch.zeros(6, 6).scatter_add_(1, draws.t(), torch.ones(6, 2000)) / 2000
    assert (freq - probs).abs().max() < 0.05
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="no candidate"):
        sample_hard_negatives(torch.zeros(2, 2), exclude=torch.ones(2, 2, dtype=torch.bool))


def test_itc_similarity_is_max_over_queries():
    query = nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    text = nn.functional.normalize(torch.randn(5, 8), dim=-1)
    sim = itc_similarity(query, text)
    assert sim.shape == (3, 5)
    assert torch.allclose(sim[1, 2], (query[1] @ text[2]).max())


class _FrozenEncoder(nn.Module):
    """Stand-in image encoder: 16×16 images -> 16 patch tokens of width 16."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.drop = nn.Dropout(0.5)

    def forward(self, images):
        return self.drop(self.patch(images).flatten(2).transpose(1, 2))


def test_stage1_gradients_reach_only_trainable_parts():
    torch.manual_seed(0)
    cfg = QFormerConfig.tiny(hidden=32, heads=2, intermediate=64, layers=2, num_queries=4, encoder_width=16,
                             vocab_size=30, max_positions=8)
    encoder = _FrozenEncoder()
    model = Blip2Stage1(cfg, dec_token_id=29, embed_dim=16, image_encoder=encoder).train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    ids, mask = _text(4, 6, 29, [6, 5, 4, 3])
    out = model(torch.randn(4, 3, 16, 16), ids, mask)
    assert torch.isfinite(out.loss) and out.loss > 0 and out.sim_i2t.shape == (4, 4)
    out.loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("image_encoder") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert model.lm_head.decoder.weight is model.qformer.word_embeddings.weight


def test_stage1_rejects_single_pair_and_bad_dec_id():
    cfg = QFormerConfig.tiny(hidden=32, heads=2, intermediate=64, layers=1, num_queries=2, encoder_width=16,
                             vocab_size=30, max_positions=8)
    with pytest.raises(ValueError, match="dec_token_id 30"):
        Blip2Stage1(cfg, dec_token_id=30)
    model = Blip2Stage1(cfg, dec_token_id=29)
    with pytest.raises(ValueError, match="at least 2"):
        model(torch.randn(1, 5, 16), torch.ones(1, 4, dtype=torch.long))


# --- bad inputs ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    cfg = QFormerConfig.tiny(hidden=32, heads=2, intermediate=64, layers=1, num_queries=2, encoder_width=16,
                             vocab_size=30, max_positions=8)
    qf = QFormer(cfg)
    feats, ids = torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[batch, tokens, 16\].*got \(2, 5, 24\)"):
        qf(torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="9 tokens, more than max_positions=8"):
        qf(feats, torch.ones(2, 9, dtype=torch.long), mode="itm")
    with pytest.raises(ValueError, match="unknown Q-Former mode 'itx'"):
        qf(feats, ids, mode="itx")
    with pytest.raises(ValueError, match="needs text_ids"):
        qf(feats, mode="itg")
    with pytest.raises(ValueError, match="mode 'queries'"):
        qf(feats, ids)
    with pytest.raises(ValueError, match="batch sizes differ"):
        qf(feats, torch.ones(3, 4, dtype=torch.long), mode="itc")
    with pytest.raises(ValueError, match="does not match"):
        qf(feats, ids, torch.ones(2, 3), mode="itc")
    with pytest.raises(ValueError, match="unknown attention-mask layout"):
        attention_masks(2, torch.ones(2, 4), "queries")
    with pytest.raises(ValueError, match="divisible by heads"):
        QFormerConfig.tiny(heads=3)
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        QFormerConfig.tiny(cross_attention_frequency=0)


def test_ln_vision_is_a_trainable_layernorm_on_the_frozen_features():
    """LAVIS's ``ln_vision``: the Q-Former with it equals the one without it fed LayerNorm(features) by hand."""
    cfg = QFormerConfig.tiny(hidden=32, heads=2, intermediate=64, layers=2, num_queries=4, encoder_width=16,
                             vocab_size=20, dropout=0.0)
    torch.manual_seed(0)
    with_ln = QFormer(replace(cfg, ln_vision=True)).eval()
    without = QFormer(cfg).eval()
    assert set(with_ln.state_dict()) - set(without.state_dict()) == {"ln_vision.weight", "ln_vision.bias"}
    without.load_state_dict({k: v for k, v in with_ln.state_dict().items() if not k.startswith("ln_vision.")})
    with torch.no_grad():
        with_ln.ln_vision.weight.uniform_(0.5, 1.5)
        with_ln.ln_vision.bias.normal_()
    feats = torch.randn(2, 5, 16) * 3 + 1
    by_hand = torch.nn.functional.layer_norm(feats, (16,), with_ln.ln_vision.weight, with_ln.ln_vision.bias)
    assert torch.allclose(with_ln(feats).query, without(by_hand).query, atol=1e-6)
    assert not torch.allclose(with_ln(feats).query, without(feats).query, atol=1e-3)


def test_config_presets():
    base = QFormerConfig.bert_base()
    assert (base.hidden, base.layers, base.heads, base.intermediate, base.num_queries, base.cross_attention_frequency) == (
        768, 12, 12, 3072, 32, 2)
    tiny = QFormer(QFormerConfig.tiny())
    assert tiny.query_tokens.shape == (1, 16, 128)
    assert [layer.cross_attn is not None for layer in tiny.layers] == [True, False, True, False]


# --- labkit.core.blocks blocks ---------------------------------------------------------------------------------

def test_attention_paths_agree_and_survive_empty_rows():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, kv_dim=12).eval()
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[0, 0, 1] = False  # a row with nothing to attend to
    fast, none = attn(x, kv, mask=mask)
    slow, probs = attn(x, kv, mask=mask, need_weights=True)
    assert none is None and probs.shape == (2, 4, 5, 7)
    assert torch.allclose(fast, slow, atol=1e-6) and torch.isfinite(fast).all()
    blocked = ~mask.expand_as(probs).clone()
    blocked[0, :, 1] = False
    assert (probs[blocked] == 0).all()
    assert torch.allclose(probs[0, :, 1], torch.full((4, 7), 1 / 7))  # an empty row averages uniformly, as in BERT


def test_gates_match_physical_pruning():
    torch.manual_seed(0)
    block, ffn = AttentionBlock(16, 4).eval(), FeedForwardBlock(16, 24).eval()
    x = torch.randn(2, 5, 16)
    head_gate = torch.tensor([1.0, 0.0, 1.0, 0.0])
    unit_gate = (torch.arange(24) % 3 != 0).float()
    with torch.no_grad():
        gated, _ = block(x, head_gate=head_gate)
        gated_ffn = ffn(x, unit_gate=unit_gate)
        block.prune_heads(head_gate.bool())
        ffn.prune_units(unit_gate.bool())
        pruned, maps = block(x, need_weights=True)
    assert block.attn.heads == 2 and block.attn.query.weight.shape == (8, 16) and block.attn.out.weight.shape == (16, 8)
    assert ffn.units == 16 and ffn.dense_out.weight.shape == (16, 16)
    assert maps.shape == (2, 2, 5, 5)
    assert torch.allclose(gated, pruned, atol=1e-6) and torch.allclose(gated_ffn, ffn(x), atol=1e-6)
    block.prune_heads([])  # every head removed: the block still runs (residual + out bias)
    assert block(x)[0].shape == x.shape
    with pytest.raises(ValueError, match=r"heads to keep must lie in \[0, 0\)"):
        block.prune_heads([0])
    with pytest.raises(ValueError, match=r"unit_gate must have shape \(16,\)"):
        ffn(x, unit_gate=torch.ones(24))
    with pytest.raises(ValueError, match="boolean"):
        block(x, mask=torch.ones(1, 1, 5, 5))
