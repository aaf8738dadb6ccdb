"""Tip-Adapter math against plain loops, input checks, Tip-Adapter-F, the eval command's format, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from labkit.tipadapter import cache as tip
from labkit.tipadapter import eval as tip_eval
from labkit.tipadapter import viz as viz_tip


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A randomly initialised toy CLIP in local-dir layout (tests never depend on a trained checkpoint)."""
    from labkit.clip.model import save_local_dir
    from labkit.clip.pretrain import new_toy_clip

    torch.manual_seed(0)
    clip = new_toy_clip(device="cpu")
    return str(save_local_dir(clip.model, clip.config, tmp_path_factory.mktemp("toy_clip")))


@pytest.fixture(scope="module")
def clip(toy_dir):
    from labkit.clip.model import load_clip

    return load_clip(f"local-dir:{toy_dir}", device="cpu")


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------- math vs plain loops

def plain_tip_logits(f, W, keys, values, alpha, beta):
    """Independent reference: one query, one class, one support at a time, no matrix products."""
    B, C, M = len(f), len(W), len(keys)
    out = [[0.0] * C for _ in range(B)]
    for b in range(B):
        for c in range(C):
            text = 100.0 * sum(float(f[b, d]) * float(W[c, d]) for d in range(f.shape[1]))
            cache = 0.0
            for m in range(M):
                cos = sum(float(f[b, d]) * float(keys[m, d]) for d in range(f.shape[1]))
                cache += math.exp(-beta * (1.0 - cos)) * float(values[m, c])
            out[b][c] = text + alpha * cache
    return torch.tensor(out)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (3.5, 5.5), (0.0, 2.0)])
def test_tip_logits_match_plain_loop(alpha, beta):
    f, W, keys = unit(5, 16, seed=1), unit(3, 16, seed=2), unit(9, 16, seed=3)
    values = F.one_hot(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]), 3).float()
    got = tip.tip_logits(f, W, keys, values, alpha, beta)
    torch.testing.assert_close(got, plain_tip_logits(f, W, keys, values, alpha, beta), rtol=1e-4, atol=1e-4)


def test_cache_from_features_matches_loop():
    views = torch.randn(4, 6, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cache = tip.cache_from_features(views, labels, ("a", "b", "c"))
    for i in range(6):
        mean = sum(views[v, i] for v in range(4)) / 4
        torch.testing.assert_close(cache.keys[i], mean / mean.norm())
        assert cache.values[i].tolist() == [1.0 if c == labels[i] else 0.0 for c in range(3)]
    assert torch.allclose(cache.keys.norm(dim=-1), torch.ones(6))


def test_search_matches_brute_force_and_prefers_cache_when_text_is_useless():
    torch.manual_seed(0)
    C, K, D = 4, 3, 16
    centers = unit(C, D, seed=5)
    keys = F.normalize(centers.repeat_interleave(K, 0) + 0.3 * torch.randn(C * K, D), dim=-1)
    values = F.one_hot(torch.arange(C).repeat_interleave(K), C).float()
    labels = torch.arange(C).repeat(10)
    feats = F.normalize(centers[labels] + 0.3 * torch.randn(len(labels), D), dim=-1)
    W = unit(C, D, seed=9)  # a text classifier unrelated to the images
    alphas, betas = (0.0, 0.1, 1.0, 10.0, 100.0), (1.0, 5.0)
    s = tip.search_alpha_beta(feats, labels, W, keys, values, alphas=alphas, betas=betas)
    for i, b in enumerate(betas):
        for j, a in enumerate(alphas):
            logits = plain_tip_logits(feats[:6], W, keys, values, a, b)
            torch.testing.assert_close(logits, tip.tip_logits(feats[:6], W, keys, values, a, b), rtol=1e-4,
                                       atol=1e-3)
            assert s["grid"][i, j] == pytest.approx(tip.accuracy(tip.tip_logits(feats, W, keys, values, a, b),
                                                                 labels))
    best = float(s["grid"].max())
    assert best - math.sqrt(best * (1 - best) / len(labels)) - 1e-6 <= s["accuracy"] <= best  # one-SE rule
    assert s["alpha"] >= 10.0 and s["cache_helps"]  # useless text: the best mix leans on the cache
    good_text = centers  # a text classifier that already separates the classes: keep (almost) zero-shot
    s = tip.search_alpha_beta(feats, labels, good_text, keys, values, alphas=alphas, betas=betas)
    assert not s["cache_helps"] and s["alpha"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        tip.search_alpha_beta(feats[:0], labels[:0], W, keys, values)


@pytest.mark.parametrize("n_fixed, helps", [(3, False), (8, True)])
def test_search_keeps_the_cache_only_when_mcnemar_says_it_helps(n_fixed, helps):
    """Text right on all but ``n_fixed`` of 200 images, a cache that fixes exactly those: 3 fixed, 0 broken
    is chi2 = 3, below the critical 5.73 (5 %, Bonferroni over 3 non-zero settings): zero-shot is kept
    although validation accuracy rises; 8 is 8 > 5.73."""
    C, D = 4, 16
    centers = unit(C, D, seed=5)
    labels = torch.arange(200) % C
    feats = F.normalize(centers[labels] + 0.05 * torch.randn(200, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    labels[:n_fixed] = (labels[:n_fixed] + 1) % C  # the text classifier (centers) gets these wrong
    keys, values = feats, F.one_hot(labels, C).float()  # a cache holding every image: it knows the true labels
    s = tip.search_alpha_beta(feats, labels, centers, keys, values, alphas=(0.0, 1.0, 10.0, 1000.0), betas=(1000.0,))
    assert s["mcnemar"] == {"fixed": n_fixed, "broken": 0, "chi2": float(n_fixed), "critical": 5.731}  # of the candidate
    assert s["zero_shot_accuracy"] == pytest.approx(1 - n_fixed / 200)
    assert float(s["grid"].max()) == 1.0
    assert s["cache_helps"] is helps and (s["alpha"] > 0) is helps


def test_mcnemar_critical_values_are_the_chi2_quantiles():
    assert tip.mcnemar_critical(1) == pytest.approx(3.8415, abs=1e-4)  # chi2(1) at 5 %
    assert tip.mcnemar_critical(10) == pytest.approx(7.8794, abs=1e-4)  # chi2(1) at 0.5 %
    assert tip.mcnemar_critical(232) > tip.mcnemar_critical(10)


def test_augment_views_shapes_randomness_and_identity():
    img = torch.linspace(0, 255, 32).round().to(torch.uint8).view(1, 1, 1, 32).expand(2, 3, 32, 32).contiguous()
    views = tip.augment_views(img, 10, generator=torch.Generator().manual_seed(0))
    assert views.shape == (10, 2, 3, 32, 32) and views.dtype == torch.uint8
    assert len({v.float().sum().item() for v in views[:, 0]}) > 5  # every view is its own crop
    again = tip.augment_views(img, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(views, again)
    full = tip.augment_views(img, 6, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(1))
    for v in full.flatten(0, 1):  # a full-image crop is the image or its mirror
        err = min((v.float() - img[0].float()).abs().mean(), (v.float() - img[0].flip(-1).float()).abs().mean())
        assert err < 3.0
    with pytest.raises(ValueError, match="uint8"):
        tip.augment_views(img.float(), 2)


# ---------------------------------------------------------------- inputs rejected

def test_bad_support_sets_are_rejected(clip):
    imgs = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 2 classes"):
        tip.build_cache(clip, imgs, torch.zeros(4, dtype=torch.long), ["only"])
    with pytest.raises(ValueError, match="no support image"):
        tip.build_cache(clip, imgs, torch.tensor([0, 0, 1, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicate"):
        tip.build_cache(clip, imgs, torch.tensor([0, 0, 1, 1]), ["cat", " Cat"])
    with pytest.raises(ValueError, match="empty"):
        tip.build_cache(clip, imgs, torch.tensor([0, 0, 1, 1]), ["cat", "  "])
    with pytest.raises(ValueError, match="one label per"):
        tip.build_cache(clip, imgs, torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tip.build_cache(clip, imgs[:, :1], torch.tensor([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="fewer than shots=3"):
        tip.select_shots(torch.tensor([0, 0, 1, 1, 1]), 3, 2)
    with pytest.raises(ValueError, match="unknown Tip-Adapter task"):
        tip_eval.task_data("imagenet", "test", 10)


def test_build_cache_on_a_real_model(clip):
    imgs, labels, names, _ = tip_eval.task_data("shape", "support", 60)
    idx = tip.select_shots(labels, 2, len(names))
    cache = tip.build_cache(clip, imgs[idx], labels[idx], names, n_views=3)
    assert cache.keys.shape == (12, clip.embed_dim) and cache.values.shape == (12, 6)
    assert torch.allclose(cache.keys.norm(dim=-1), torch.ones(12), atol=1e-5)
    assert cache.keys.device == clip.device
    with pytest.raises(TimeoutError):
        tip.build_cache(clip, imgs[idx], labels[idx], names, n_views=3, deadline=0.0)


# ---------------------------------------------------------------- Tip-Adapter-F and the linear probe

def _blobs(C=3, n=20, D=16, noise=0.6, seed=0):
    """Noisy unit features around fixed class centres (the same centres for every ``seed``)."""
    centers = unit(C, D, seed=100)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(n)
    return F.normalize(centers[y] + noise * torch.randn(len(y), D, generator=g), dim=-1), y, centers


def _views(feats, n_views=4, seed=7):
    """``n_views`` distinct noisy copies of each feature: ``[V, N, D]``."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(feats[None] + 0.1 * torch.randn(n_views, *feats.shape, generator=g), dim=-1)


def test_finetune_keys_lowers_the_training_loss_and_returns_its_best_validation_keys():
    feats, y, _ = _blobs()
    views = _views(feats)
    val_f, val_y, _ = _blobs(seed=1)
    W = 0.01 * unit(3, 16, seed=4)  # a weak text classifier: the cache decides, so its keys are worth training
    cache = tip.cache_from_features(views[:, :6], y[:6], ("a", "b", "c"))

    def train_loss(keys):  # cross-entropy of the fused logits over every view, written out here
        logits = 100 * views.flatten(0, 1) @ W.T + 5.0 * torch.exp(-5.0 * (1 - views.flatten(0, 1) @ keys.T)) @ cache.values
        return F.cross_entropy(logits, y.repeat(len(views))).item()

    keys, info = tip.finetune_keys(cache, views, y, W, val_f, val_y, alpha=5.0, beta=5.0, epochs=20, batch_size=16)
    assert keys.shape == cache.keys.shape and not keys.requires_grad and not torch.equal(keys, cache.keys)
    assert len(info["curve"]) == 20
    assert train_loss(keys) < train_loss(cache.keys) - 0.01
    assert tip.accuracy(tip.tip_logits(val_f, W, keys, cache.values, 5.0, 5.0), val_y) == info["best_val_accuracy"]
    same, _ = tip.finetune_keys(cache, views, y, W, val_f, val_y, epochs=0)
    assert torch.equal(same, cache.keys)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        tip.finetune_keys(cache, views, y, W, val_f, val_y, alpha=0.0)
    with pytest.raises(ValueError, match="one label per image"):
        tip.finetune_keys(cache, views.flatten(0, 1), y, W, val_f, val_y)


def test_finetune_keys_sees_every_support_image_once_per_epoch_in_one_of_its_views(monkeypatch):
    """The official protocol: one augmentation of each image per epoch (not every cached view every epoch)."""
    feats, y, _ = _blobs(n=10)
    views = _views(feats, n_views=5)
    val_f, val_y, _ = _blobs(n=4, seed=1)
    W = unit(3, 16, seed=4)
    cache = tip.cache_from_features(views, y, ("a", "b", "c"))
    seen, real = [], tip.tip_logits

    def spy(queries, *args, **kwargs):
        if len(queries) != len(val_f):  # a training batch, not a validation pass
            seen.append(queries.detach().clone())
        return real(queries, *args, **kwargs)

    monkeypatch.setattr(tip, "tip_logits", spy)
    tip.finetune_keys(cache, views, y, W, val_f, val_y, alpha=5.0, beta=5.0, epochs=3, batch_size=8)
    rows = torch.cat(seen)
    assert len(rows) == 3 * len(y)  # 30 images x 3 epochs, in batches of 8
    match = (rows[:, None, None] == views[None]).all(-1).nonzero()  # (row, view, image) of every exact match
    assert len(match) == len(rows), "every training row must be exactly one view of one support image"
    for epoch in range(3):
        images = match[match[:, 0] // len(y) == epoch, 2]
        assert sorted(images.tolist()) == list(range(len(y)))


def test_linear_probe_separates_blobs():
    feats, y, _ = _blobs(noise=0.3)
    val_f, val_y, _ = _blobs(noise=0.3, seed=1)
    probe, info = tip.linear_probe(feats, y, val_f, val_y, 3)
    assert info["val_accuracy"] > 0.9 and info["weight_decay"] in (1e-4, 1e-3, 1e-2, 1e-1)


# ---------------------------------------------------------------- labkit eval tip

def _check_format(result, shots):
    assert set(result["timing_s"]) >= {"cache_build", "tip_adapter_f_finetune"}
    for task, r in result["results"].items():
        assert isinstance(r["zero_shot"], float) and 0 <= r["zero_shot"] <= 1, task
        for method in ("tip_adapter", "tip_adapter_f", "linear_probe"):
            assert list(r[method]) == [str(s) for s in shots], (task, method)
            assert all(0.0 <= v <= 1.0 for v in r[method].values())


def test_eval_tip_command_prints_the_documented_json(toy_dir, capsys, monkeypatch):
    from labkit.cli import main

    monkeypatch.setenv("LABKIT_FAST", "1")
    code = main(["eval", "tip", "--json", "--model", f"local-dir:{toy_dir}", "--tasks", "shape,mnist",
                 "--n-val", "40", "--n-test", "40"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _check_format(result, (1, 2, 4, 8, 16))
    assert set(result["results"]) == {"shape", "mnist"}
    assert set(result["search"]["mnist"]["16"]) == {"alpha", "beta", "alpha_f", "beta_f"}


def test_mnist_is_real_split_and_disjoint():
    imgs, labels = tip_eval.mnist_images()
    assert imgs.shape == (5000, 3, 64, 64) and imgs.dtype == torch.uint8 and set(labels.tolist()) == set(range(10))
    parts = {r: tip_eval.task_data("mnist", r, 5000)[0] for r in ("support", "val", "test")}
    assert [len(p) for p in parts.values()] == [1000, 1000, 3000]
    flat = {r: {hash(x.numpy().tobytes()) for x in p[:300]} for r, p in parts.items()}
    assert not flat["support"] & flat["test"] and not flat["val"] & flat["test"]


# ---------------------------------------------------------------- plots

def test_plots_are_figures(tmp_path):
    keys = unit(12, 16)
    values = F.one_hot(torch.arange(3).repeat_interleave(4), 3).float()
    s = tip.search_alpha_beta(unit(20, 16, seed=2), torch.arange(20) % 3, unit(3, 16, seed=3), keys, values)
    r = {"zero_shot": 0.3, "tip_adapter": {"1": 0.4, "16": 0.8}, "tip_adapter_f": {"1": 0.4, "16": 0.9},
         "linear_probe": {"1": 0.2, "16": 0.7}}
    figs = [viz_tip.cache_figure(keys, values, ("a", "b", "c")),
            viz_tip.probabilities_figure(("a", "b", "c"), [0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.5, 0.25, 0.25]),
            viz_tip.accuracy_vs_shots_figure({"shape": r, "mnist": r}),
            viz_tip.alpha_beta_grid_figure(s), viz_tip.alpha_curves_figure({"x": s, "y": s})]
    for i, fig in enumerate(figs):
        assert isinstance(fig, Figure)
        fig.savefig(tmp_path / f"{i}.png")


def test_accuracy_splits_ties():
    labels = torch.tensor([0, 1, 2, 3])
    assert tip.accuracy(torch.zeros(4, 4), labels) == pytest.approx(0.25)  # all tied: chance, not class 0's share
    assert tip.accuracy(torch.eye(4), labels) == 1.0
    assert tip.accuracy(torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4), labels) == pytest.approx(0.25)
