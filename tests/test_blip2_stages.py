"""BLIP-2 stage 2 (ICML 2023, §3.3) and the ToyWorld pipeline: frozen features, soft prompts, losses, errors, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labkit.blip2.data import FrozenPatchEncoder, Stage1Batches, Stage2Batches, question_type, render, tokenizer
from labkit.blip2.eval import caption_attribute_hits, parse_caption, query_cross_attention, question_attention
from labkit.blip2.lm import TextBatch, decoder_labels, lm_generate, lm_loss, new_lm, pack_left
from labkit.blip2.stage1 import Blip2Stage1
from labkit.blip2.stage2 import Blip2Stage2
from labkit.blip2.train import load_stage2, new_text_lm, stage1_config
from labkit.clip.pretrain import new_toy_clip
from labkit.core.checkpoint import save_checkpoint
from labkit.core.train import TrainConfig, fit
from labkit.data import toyworld as tw


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return new_toy_clip(device="cpu")


@pytest.fixture(scope="module")
def encoder(clip):
    return FrozenPatchEncoder(clip)


def _images(n=3):
    world = tw.ToyWorld("test", 0, n)
    return render([world.scene(i) for i in range(n)])


def _text():
    return TextBatch.from_lists([[5, 6, 7], [8]], [[9, 10, 67], [11, 67]])


def test_stage1_hard_negative_groups_vary_shape_and_colour(clip, encoder):
    """Stage-1 groups alternate: scenes differing only in shapes, then only in colours."""
    scenes, _ = Stage1Batches(encoder, clip, batch_size=32).sampler.scenes(0)
    groups = [scenes[16 + 4 * g: 20 + 4 * g] for g in range(4)]
    for g, group in enumerate(groups):
        varied, kept = ("shape", "color") if g % 2 == 0 else ("color", "shape")
        assert len({tuple(getattr(o, varied) for o in s.objects) for s in group}) == 4
        assert len({tuple(getattr(o, kept) for o in s.objects) for s in group}) == 1


def test_pretrain_batches_reject_an_empty_or_unknown_variation(clip):
    from labkit.clip.pretrain import PretrainBatches

    with pytest.raises(ValueError, match="vary must name at least one attribute"):
        PretrainBatches(clip, 32, vary=())
    with pytest.raises(ValueError, match="vary must be 'shape' or 'color', got 'size'"):
        PretrainBatches(clip, 32, vary=("shape", "size"))  # rejected when built, not at the first batch


def test_encoder_gives_second_to_last_layer_patch_tokens(clip, encoder):
    images = _images(2)
    seen = {}
    block = clip.model.visual.transformer.resblocks[-2]
    handle = block.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    with torch.no_grad():
        clip.model.visual(clip.prepare(images))
    handle.remove()
    feats = encoder(images)
    assert feats.shape == (2, 64, 128) and len(encoder.blocks) == 3
    assert torch.allclose(feats, seen["x"][:, 1:], atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_shapes_and_gradients_only_reach_projection_and_qformer(kind, encoder):
    torch.manual_seed(0)
    lm = new_text_lm(kind)
    model = Blip2Stage2(stage1_config(), lm, image_encoder=encoder).train()
    assert not model.lm.training and not encoder.training
    images = _images(2)
    prompts = model.prompts(images)
    assert prompts.shape == (2, 16, lm.get_input_embeddings().embedding_dim)
    loss = model(images, _text())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters()) and all(p.grad is None for p in lm.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("qformer.", "proj.")) for n in trainable)
    assert not any("word_embeddings" in n or "ffn_text" in n for n in trainable)  # text-only parts unused in stage 2
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert set(model.trainable_state()) == set(trainable)
    out = model.generate(images, torch.tensor([[5], [5]]), torch.ones(2, 1, dtype=torch.bool), 3, eos_id=67)
    assert out.shape == (2, 3)


def test_loss_ignores_prompt_and_prefix_positions():
    torch.manual_seed(0)
    lm = new_text_lm("opt").eval()
    text = _text()
    prompts = torch.randn(2, 4, 128)
    labels = decoder_labels(4, torch.tensor([[1, 2, 3]]), torch.tensor([[False, True, True]]))
    assert labels.tolist() == [[-100] * 4 + [-100, 2, 3]]
    # by hand: [prompts; prefix; suffix] packed per row, cross-entropy on the suffix tokens only
    loss = lm_loss(lm, prompts, text)
    total, count = 0.0, 0
    for row in range(2):
        pre, suf = text.prefix_ids[row][text.prefix_mask[row]], text.suffix_ids[row][text.suffix_mask[row]]
        ids = torch.cat([pre, suf])
        logits = lm(inputs_embeds=torch.cat([prompts[row:row + 1], lm.get_input_embeddings()(ids)[None]], 1)).logits[0]
        start = 4 + len(pre)
        total = total + F.cross_entropy(logits[start - 1: start - 1 + len(suf)], suf, reduction="sum")
        count += len(suf)
    assert torch.allclose(loss, total / count, atol=1e-5)
    ids, mask, flag = pack_left(torch.tensor([[1, 0, 2, 3]]), torch.tensor([[True, False, True, True]]),
                                torch.tensor([[0, 0, 1, 1]]))
    assert ids.tolist() == [[1, 2, 3, 0]] and mask.tolist() == [[True, True, True, False]] and flag.tolist() == [[0, 1, 1, 0]]


def test_t5_puts_prompts_and_prefix_in_the_encoder():
    torch.manual_seed(0)
    lm = new_text_lm("t5").eval()
    text, prompts = _text(), torch.randn(2, 4, 128)
    loss = lm_loss(lm, prompts, text)
    embeds = torch.cat([prompts, lm.get_input_embeddings()(text.prefix_ids)], 1)
    enc_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), text.prefix_mask.long()], 1)
    ref = lm(inputs_embeds=embeds, attention_mask=enc_mask, labels=text.suffix_ids.masked_fill(~text.suffix_mask, -100)).loss
    assert torch.allclose(loss, ref)
    assert not torch.allclose(loss, lm_loss(lm, prompts + 1, text))  # the decoder reads the prompts
    out = lm_generate(lm, prompts, text.prefix_ids, text.prefix_mask, 3, eos_id=67)
    assert out.shape == (2, 3)


def test_bad_inputs_raise_value_errors(encoder):
    with pytest.raises(ValueError, match="unknown language-model kind 'gpt'.*opt, t5"):
        new_lm("gpt", 68, 0, 1, 67)
    lm = new_text_lm("opt")
    model = Blip2Stage2(stage1_config(), lm)
    with pytest.raises(ValueError, match=r"\[batch, tokens, 128\].*got \(2, 64, 96\)"):
        model(torch.randn(2, 64, 96), _text())
    long = TextBatch.from_lists([[5] * 50, [5]], [[6] * 10, [6]])  # 16 prompts + 50 > 64
    with pytest.raises(ValueError, match="longer than the LM context of 64"):
        model(torch.randn(2, 64, 128), long)
    t5 = Blip2Stage2(stage1_config(), new_text_lm("t5"))
    with pytest.raises(ValueError, match="longer than the LM context of 64"):
        t5(torch.randn(2, 64, 128), long)
    with pytest.raises(ValueError, match="soft prompts have width 32"):
        lm_loss(lm, torch.randn(2, 4, 32), _text())


def test_a_few_training_steps_reduce_the_loss(encoder):
    torch.manual_seed(0)
    model = Blip2Stage2(stage1_config(), new_text_lm("opt"))
    batch, n = Stage2Batches(encoder, batch_size=8)(0)
    record = fit(model, lambda m, b: m(*b), lambda step, rank, world: (batch, n),
                 TrainConfig(steps=25, lr=3e-3, warmup=0.0), device=torch.device("cpu"), progress=False)
    losses = [h["loss"] for h in record["history"]]
    assert losses[-1] < losses[0] - 0.2, losses  # the LM is frozen (and random): the drop comes from the prompts alone


def test_stage2_batches_shape_share(encoder):
    share = lambda batches: np.mean([question_type(p) == "shape" for p in _prefix_texts(batches)])  # noqa: E731
    uniform, weighted = share(Stage2Batches(encoder, 64)), share(Stage2Batches(encoder, 64, shape_share=0.6))
    assert uniform < 0.2 < 0.3 < weighted  # vqa_fraction 0.6: about 0.6 * 0.2 uniformly, 0.6 * (0.6 + 0.4 * 0.2) weighted
    with pytest.raises(ValueError, match=r"shape_share must lie in \[0, 1\], got 1.5"):
        Stage2Batches(encoder, 8, shape_share=1.5)


def _prefix_texts(batches, steps: int = 4) -> list[str]:
    """Every sample's prefix as text ('' for a caption's lone ``<sot>``) over a few batches."""
    tok, out = tokenizer(), []
    for step in range(steps):
        (_, text), _ = batches(step)
        out += [tok.decode(row[mask].tolist()) for row, mask in zip(text.prefix_ids, text.prefix_mask)]
    return out


def test_caption_parsing_and_attribute_accuracy():
    scene = tw.ToyWorld("test", 0, 50, objects=(3, 3)).scene(0)
    rng = np.random.default_rng(0)
    assert caption_attribute_hits(scene, scene.caption()) == (3, 3)
    assert caption_attribute_hits(scene, scene.caption(rng)) == (3, 3)  # synonyms, templates, random order
    o = scene.objects[0]
    wrong_color = next(c for c in tw.COLORS if c != o.color)
    assert caption_attribute_hits(scene, scene.caption().replace(f"{o.color} {o.shape}", f"{wrong_color} {o.shape}", 1))[0] == 2
    assert parse_caption("three objects: a big red star in the upper left and a tiny blue ring on the middle") == [
        ("star", "red", "top left"), ("ring", "blue", "center")]


def test_query_cross_attention_maps(encoder):
    from labkit.blip2.qformer import QFormer

    maps = query_cross_attention(QFormer(stage1_config()).eval(), encoder(_images(2)))
    assert maps.shape == (2, 16, 8, 8)
    assert torch.allclose(maps.sum(dim=(-1, -2)), torch.ones(2, 16), atol=1e-5)
    with pytest.raises(ValueError, match="no cross-attention"):
        query_cross_attention(QFormer(stage1_config()), encoder(_images(1)), layer=1)


def test_cli_train_and_eval_qformer_json(tmp_path, clip, capsys):
    from labkit.cli import main
    from labkit.clip.model import save_local_dir

    save_local_dir(clip.model, clip.config, tmp_path / "clip")
    common = ["--assets", str(tmp_path / "blip2"), "--batch-size", "8"]
    assert main(["train", "qformer", "--stage", "2", "--lm", "gpt", *common]) == 2
    assert "unknown language-model kind 'gpt'" in capsys.readouterr().err
    assert main(["train", "qformer", "--stage", "lm", "--lm", "opt", *common, "--json"]) == 0
    clip_arg = ["--clip", f"local-dir:{tmp_path / 'clip'}"]
    assert main(["train", "qformer", "--stage", "1", *clip_arg, *common, "--json"]) == 0
    assert main(["train", "qformer", "--stage", "2", "--lm", "opt", *clip_arg, *common, "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", "qformer", "--lm", "opt", *clip_arg, "--assets", str(tmp_path / "blip2"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"trainable_params", "frozen_params", "trainable_fraction", "caption_attribute_accuracy", "vqa_accuracy",
            "itc_i2t_r1", "hf_equivalence_max_abs_diff"}
    assert keys <= result.keys()
    assert result["hf_equivalence_max_abs_diff"] <= 1e-5 and 0 < result["trainable_fraction"] <= 0.5
    assert sorted((tmp_path / "blip2").iterdir()) == [tmp_path / "blip2" / d for d in ("lm_opt", "stage1", "stage2_opt")]


def test_text_conditioned_stage2_reads_the_question_and_trains_the_text_parts(encoder, tmp_path):
    """BLIP-2 §4.3: the question enters the Q-Former; different questions give different prompts."""
    torch.manual_seed(0)
    model = Blip2Stage2(stage1_config(), new_text_lm("t5"), image_encoder=encoder, text_conditioned=True).train()
    images, text = _images(2), _text()
    with pytest.raises(ValueError, match="needs the prompt text"):
        model.prompts(images)
    loss = model(images, text)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("word_embeddings" in n for n in trainable) and any("ffn_text" in n for n in trainable)
    assert all(p.grad is None for p in model.lm.parameters())
    assert model.qformer.word_embeddings.weight.grad.abs().sum() > 0
    model.eval()
    a = model.prompts(images, torch.tensor([[5, 6], [5, 6]]), torch.ones(2, 2, dtype=torch.bool))
    b = model.prompts(images, torch.tensor([[7, 8], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
    assert not torch.allclose(a, b)
    feats = encoder(images[:1])
    maps = question_attention(model, feats, ["what shape is the red object?", "what color is the star?"])
    assert maps.shape == (2, 8, 8) and torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="needs a text-conditioned stage 2"):
        question_attention(Blip2Stage2(stage1_config(), model.lm, image_encoder=encoder), feats, ["what color is the star?"])
    save_checkpoint(tmp_path / "s2", model.trainable_state(), {"qformer": model.config.to_dict(), "text_conditioned": True},
                    {"command": "test"}, dtype=torch.float16)
    loaded = load_stage2(tmp_path / "s2", model.lm)
    assert loaded.text_conditioned
    loaded.image_encoder = encoder
    assert torch.allclose(loaded.prompts(images, torch.tensor([[5, 6], [5, 6]]), torch.ones(2, 2, dtype=torch.bool)), a,
                          atol=1e-2)  # fp16 checkpoint


def test_itc_loss_matches_a_hand_written_symmetric_smoothed_cross_entropy():
    from labkit.blip2.stage1 import itc_loss

    sim = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.8, 0.0], [-0.1, 0.4, 0.7]])
    temp, eps, n = 0.07, 0.1, 3

    def smoothed_ce(logits):  # (1 - eps) * NLL of the diagonal + eps * mean NLL over all classes, averaged over rows
        logp = logits - logits.exp().sum(dim=1, keepdim=True).log()
        return sum(-(1 - eps) * logp[i, i] - eps / n * logp[i].sum() for i in range(n)) / n

    expected = (smoothed_ce(sim / temp) + smoothed_ce(sim.t() / temp)) / 2
    assert itc_loss(sim, torch.tensor(temp), eps).item() == pytest.approx(expected.item(), rel=1e-6)


def test_itm_and_itg_losses_match_plain_formulas_on_fixed_inputs():
    """Stage 1's ITM (positives, then image-with-negative-text, then negative-image-with-text, labels 1, 0, 0) and
    ITG (the first token replaced by [DEC]; position t predicts token t + 1; padding ignored; smoothing 0.1)
    recomputed here token by token. With two pairs each one's hard negative is the other, so nothing is random."""
    torch.manual_seed(0)
    dec = tokenizer().vocab_size
    model = Blip2Stage1(stage1_config(), dec_token_id=dec, embed_dim=32).eval()
    feats = torch.randn(2, 64, model.config.encoder_width)
    ids = torch.tensor([[1, 7, 9, 11, 0], [1, 8, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = model(feats, ids, mask)
        pairs = [(0, 0, 1), (1, 1, 1), (0, 1, 0), (1, 0, 0), (1, 0, 0), (0, 1, 0)]  # (image, text, label)
        itm = sum(-torch.log_softmax(model.itm_logits(feats[i:i + 1], ids[t:t + 1], mask[t:t + 1])[0], -1)[y]
                  for i, t, y in pairs) / len(pairs)
        dec_ids = ids.clone()
        dec_ids[:, 0] = dec
        logits = model.lm_head(model.qformer(feats, dec_ids, mask, mode="itg").text)  # [B, L, V]
        eps, terms = 0.1, []
        for b in range(2):
            for t in range(ids.shape[1] - 1):
                if mask[b, t + 1]:  # predict the real token t + 1 from position t
                    logp = torch.log_softmax(logits[b, t], -1)
                    terms.append(-(1 - eps) * logp[ids[b, t + 1]] - eps * logp.mean())
        itg = sum(terms) / len(terms)
    assert len(terms) == 5  # 3 + 2 real next tokens; [DEC] itself and the padding are never targets
    assert out.itm.item() == pytest.approx(itm.item(), rel=1e-5)
    assert out.itg.item() == pytest.approx(itg.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((out.itc + out.itm + out.itg).item(), rel=1e-6)


def test_itc_temperature_is_clamped_in_place_and_keeps_its_gradient():
    """ALBEF/BLIP clamp the parameter under no_grad; an out-of-place clamp would give it zero gradient at 0.6."""
    torch.manual_seed(0)
    model = Blip2Stage1(stage1_config(), dec_token_id=tokenizer().vocab_size, embed_dim=32)
    with torch.no_grad():
        model.temp.fill_(0.6)
    feats = torch.randn(4, 64, model.config.encoder_width)
    ids = torch.randint(4, 20, (4, 8))
    model(feats, ids).loss.backward()
    assert model.temp.item() == pytest.approx(0.5) and model.temp.grad is not None and model.temp.grad.abs().item() > 0


def test_training_loops_evaluate_on_validation_never_on_test(monkeypatch):
    """Every in-training evaluation (toy CLIP, text LM, stage 1, stage 2) draws validation scenes."""
    from labkit.blip2.train import train_stage1, train_stage2, train_text_lm
    from labkit.clip.pretrain import train_toy_clip

    splits = []
    original = tw.ToyWorld.__init__

    def recording_init(self, split="train", *args, **kwargs):
        splits.append(split)
        original(self, split, *args, **kwargs)

    monkeypatch.setattr(tw.ToyWorld, "__init__", recording_init)
    clip, _ = train_toy_clip(steps=2, batch_size=8, eval_n=8, progress=False)
    encoder = FrozenPatchEncoder(clip)
    train_text_lm("opt", steps=2, batch_size=4, progress=False)
    stage1, _ = train_stage1(encoder, clip, steps=2, batch_size=4, progress=False)
    train_stage2(encoder, new_text_lm("opt"), stage1, steps=2, batch_size=4, eval_n=4, progress=False)
    assert "val" in splits and "test" not in splits, sorted(set(splits))


def test_stage1_with_ln_vision_saves_and_loads_it(tmp_path):
    """``labkit train qformer --stage 1 --ln-vision``: the LayerNorm is trained, saved, loaded, and stage 2 keeps it."""
    from labkit.blip2.commands import train_qformer
    from labkit.blip2.train import checkpoint_dir, load_stage1

    train_qformer(stage="1", steps=2, batch_size=4, assets=str(tmp_path), ln_vision=True, progress=False)
    stage1 = load_stage1(checkpoint_dir("stage1", tmp_path))
    assert stage1.config.ln_vision and isinstance(stage1.qformer.ln_vision, torch.nn.LayerNorm)
    assert not torch.equal(stage1.qformer.ln_vision.weight, torch.ones_like(stage1.qformer.ln_vision.weight))  # trained
    with pytest.raises(ValueError, match="stage 1"):
        train_qformer(stage="2", lm="t5", assets=str(tmp_path), ln_vision=True, progress=False)
