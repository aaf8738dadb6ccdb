"""FLIP random masking and Cluster Masking: counts, exact ratios, the cluster property, the open_clip hook."""

import copy
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import PatchDropout

from labkit.clip.pretrain import new_toy_clip
from labkit.data import toyworld as tw
from labkit.masking import masks as M


@pytest.fixture(scope="module")
def toy():
    return new_toy_clip(device="cpu")


@pytest.fixture(scope="module")
def vit_b32():
    logging.getLogger().setLevel(logging.ERROR)
    return open_clip.create_model("ViT-B-32")


def two_texture_image(size=64, patch=8):
    """Left half: horizontal ramps in every patch; right half: vertical ramps (orthogonal after normalisation)."""
    ramp = torch.linspace(-1, 1, patch)
    h = ramp.view(1, patch).expand(patch, patch)
    img = torch.zeros(3, size, size)
    g = size // patch
    for i in range(g):
        for j in range(g):
            img[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = h if j < g // 2 else h.T
    return img


@pytest.mark.parametrize("n", [1, 7, 49, 64, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 0.99])
def test_keep_count_matches_open_clip_patch_dropout(n, ratio):
    x = torch.randn(3, 1 + n, 4)
    expected = x.shape[1] - 1 if ratio == 0 else PatchDropout(ratio).train()(x).shape[1] - 1
    assert M.num_keep(n, ratio) == max(1, int(n * (1 - ratio)))
    if ratio > 0:
        assert M.num_keep(n, ratio) == expected
    keep = M.random_keep_indices(3, n, ratio)
    assert keep.shape == (3, M.num_keep(n, ratio))


def test_random_indices_unique_sorted_in_range_and_seeded():
    g = torch.Generator().manual_seed(0)
    keep = M.random_keep_indices(16, 64, 0.75, generator=g)
    assert keep.shape == (16, 16)
    assert ((keep >= 0) & (keep < 64)).all()
    assert (keep[:, 1:] > keep[:, :-1]).all()  # sorted, hence no duplicates
    again = M.random_keep_indices(16, 64, 0.75, generator=torch.Generator().manual_seed(0))
    other = M.random_keep_indices(16, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    assert len({tuple(k.tolist()) for k in keep}) > 1  # per-sample, not one mask for the batch


def test_random_masking_is_uniform_over_patches():
    keep = M.random_keep_indices(4000, 16, 0.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(keep.flatten(), minlength=16).float() / 4000
    assert torch.allclose(freq, torch.full((16,), 0.5), atol=0.04)


@pytest.mark.parametrize("fill", ["random", "similarity"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_cluster_exact_ratio_per_image_and_cluster_property(fill, ratio):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(6, 3, 64, 64, generator=g)
    imgs[0] = 0.3  # a flat image: no pixel clusters at all
    imgs[1] = two_texture_image()  # one huge cluster
    keep, d = M.cluster_keep_indices(imgs, 8, ratio, anchor_ratio=0.05, fill=fill, generator=g,
                                     return_diagnostics=True)
    n, k = 64, M.num_keep(64, ratio)
    assert keep.shape == (6, k)
    assert (keep[:, 1:] > keep[:, :-1]).all()
    masked = d["masked"]
    assert (masked.sum(1) == n - k).all()  # exact ratio for every image
    assert torch.equal(masked, M.keep_to_mask(keep, n))
    assert (d["score"][d["member"]] > M.DEFAULT_THRESHOLD).all()
    assert d["anchors"].shape == (6, M.num_anchors(64, 0.05))
    for b in range(6):
        members, want = int(d["member"][b].sum()), n - k
        if members <= want:  # the whole cluster is masked, the rest is top-up
            assert masked[b][d["member"][b]].all()
            assert int(d["topped_up"][b].sum()) == want - members
        else:  # trimmed: only members are masked, and the most similar ones
            assert not d["topped_up"][b].any()
            assert d["score"][b][masked[b]].min() >= d["score"][b][d["trimmed"][b]].max() - 1e-3
        assert masked[b][d["anchors"][b]].all()  # anchors are the first patches masked
    if fill == "similarity":  # one per-image threshold on the sorted scores
        for b in range(6):
            assert d["score"][b][masked[b]].min() >= d["score"][b][~masked[b]].max() - 1e-3


def test_cluster_masks_the_anchor_texture():
    img = two_texture_image()[None].repeat(8, 1, 1, 1)
    keep, d = M.cluster_keep_indices(img, 8, 0.5, anchor_ratio=0.01, generator=torch.Generator().manual_seed(3),
                                     return_diagnostics=True)
    col = torch.arange(64) % 8
    for b in range(8):
        left = bool(col[d["anchors"][b, 0]] < 4)
        half = (col < 4) if left else (col >= 4)
        assert torch.equal(d["masked"][b], half)  # exactly the anchor's texture is dropped
        assert torch.equal(d["member"][b], half)


def test_cluster_embedding_similarity_groups_flat_regions():
    img = torch.full((2, 3, 32, 32), 0.2)
    img[:, :, :, :16] = 0.8  # left half light grey, right half dark grey: flat, no pixel structure
    col = torch.arange(16) % 4
    emb = torch.stack([(col < 2).float(), (col >= 2).float()], dim=-1)[None].repeat(2, 1, 1)  # one-hot colour
    _, d0 = M.cluster_keep_indices(img, 8, 0.5, anchor_ratio=0.01, return_diagnostics=True)
    assert int(d0["member"].sum()) == 2  # pixels alone: only the anchors themselves
    _, d1 = M.cluster_keep_indices(img, 8, 0.5, anchor_ratio=0.01, embeddings=emb, embed_weight=0.8,
                                   return_diagnostics=True)
    for b in range(2):
        left = bool(col[d1["anchors"][b, 0]] < 2)
        assert torch.equal(d1["masked"][b], (col < 2) if left else (col >= 2))


def test_cluster_seeded_and_vectorised_over_batch():
    imgs = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = M.cluster_keep_indices(imgs, 8, 0.5, generator=torch.Generator().manual_seed(7))
    b = M.cluster_keep_indices(imgs, 8, 0.5, generator=torch.Generator().manual_seed(7))
    c = M.cluster_keep_indices(imgs, 8, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(k.tolist()) for k in a}) == 5  # a different mask per image


def test_similarity_matrix_is_cosine():
    imgs = torch.randn(2, 3, 32, 32)
    sim = M.similarity_matrix(imgs, 8)
    assert sim.shape == (2, 16, 16)
    assert torch.allclose(sim.diagonal(dim1=1, dim2=2), torch.ones(2, 16), atol=1e-5)
    assert torch.allclose(sim, sim.transpose(1, 2), atol=1e-6)
    shifted = M.similarity_matrix(imgs * 3 + 2, 8)  # per-patch normalisation: invariant to gain and offset
    assert torch.allclose(sim, shifted, atol=1e-4)


@pytest.mark.parametrize("strategy", ["random", "cluster"])
def test_install_toy_cls_kept_tokens_gathered_and_eval_untouched(toy, strategy):
    model = copy.deepcopy(toy.model)
    visual = model.visual
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = visual(x)
    M.install(model, strategy, 0.75)
    seen = {}
    handle = visual.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", i[0]))
    with torch.no_grad():
        after = visual(x)
    assert torch.equal(before, after)  # eval mode: nothing masked
    assert seen["tokens"].shape[1] == 65
    full = seen["tokens"]
    visual.train()
    with torch.no_grad():
        visual(x)
    handle.remove()
    keep = visual.patch_dropout.last_keep
    assert keep.shape == (4, 16) and seen["tokens"].shape == (4, 17, 128)
    assert torch.allclose(seen["tokens"][:, 0], full[:, 0], atol=1e-5)  # CLS (BatchNorm in train mode aside)
    M.install(model, "none", 0.0)
    assert isinstance(visual.patch_dropout, torch.nn.Identity) and not visual._forward_pre_hooks


def test_install_survives_deepcopy(toy):
    model = M.install(copy.deepcopy(toy.model), "cluster", 0.5)
    twin = copy.deepcopy(model).train()
    with torch.no_grad():
        twin.visual(torch.randn(2, 3, 64, 64))
    assert twin.visual.patch_dropout.last_keep.shape == (2, 32)
    assert model.visual.patch_dropout.last_keep is None


def test_install_on_stock_vit_b32_trains(vit_b32):
    model = copy.deepcopy(vit_b32)
    M.install(model, "cluster", 0.5, embed_weight=0.5)
    model.train()
    images = torch.randn(2, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a cat", "a dog"])
    img_f, txt_f, scale = model(images, tokens)
    open_clip.ClipLoss()(img_f, txt_f, scale).backward()
    assert model.visual.patch_dropout.last_keep.shape == (2, 24)  # 49 patches at 224 px / 32
    assert model.visual.conv1.weight.grad is not None
    assert model.text.token_embedding.weight.grad is not None if hasattr(model, "text") else True


def test_patch_masking_matches_patch_dropout_output_shape(vit_b32):
    visual = copy.deepcopy(vit_b32.visual)
    x = torch.randn(2, 50, visual.class_embedding.shape[0])
    for ratio in (0.25, 0.5, 0.75):
        ours = M.PatchMasking("random", ratio, 32).train()(x)
        theirs = PatchDropout(ratio).train()(x)
        assert ours.shape == theirs.shape
        assert torch.equal(ours[:, 0], x[:, 0])
        rows = ours[:, 1:].unsqueeze(2) == x[:, 1:].unsqueeze(1)  # each kept token is one of the inputs
        assert rows.all(-1).any(-1).all()


def test_unmasked_tuning_and_set_ratio(toy):
    model = copy.deepcopy(toy.model).train()
    M.install(model, "random", 0.5, unmasked_tuning_steps=1, total_steps=3)
    seen = []
    model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        for _ in range(3):
            model.visual(torch.randn(2, 3, 64, 64))
    assert seen == [33, 33, 65]
    M.set_ratio(model, 0.75)
    assert model.visual.patch_dropout.ratio == 0.75


def test_bad_inputs_raise_clear_errors(toy):
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            M.random_keep_indices(2, 16, bad)
    for bad in (0.0, -1, 1.01):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            M.cluster_keep_indices(torch.randn(1, 3, 32, 32), 8, 0.5, anchor_ratio=bad)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        M.cluster_keep_indices(torch.randn(1, 3, 36, 36), 8, 0.5)
    with pytest.raises(ValueError, match="unknown masking strategy 'blocks'"):
        M.install(copy.deepcopy(toy.model), "blocks", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        M.install(copy.deepcopy(toy.model), "random", 1.0)
    with pytest.raises(ValueError, match="unknown fill"):
        M.cluster_keep_indices(torch.randn(1, 3, 32, 32), 8, 0.5, fill="nearest")
    with pytest.raises(ValueError, match="not an open_clip VisionTransformer"):
        M.install(torch.nn.Linear(2, 2), "random", 0.5)
    with pytest.raises(ValueError, match="total_steps"):
        M.install(copy.deepcopy(toy.model), "random", 0.5, unmasked_tuning_steps=5)


# ---------------------------------------------------------------- studies, plots, CLI, scale-out

def test_bench_masking_fast_reports_ratios_and_ideals():
    from labkit.masking.bench import bench_masking

    res = bench_masking(models=("toy",))
    m = res["models"][0]
    assert {(r["strategy"], r["ratio"]) for r in m["rows"]} == {
        ("none", 0.0), ("random", 0.5), ("random", 0.75), ("cluster", 0.5), ("cluster", 0.75)}
    for r in m["rows"]:
        assert r["images_per_s"] > 0 and r["ideal"] == round(1 / (1 - r["ratio"]), 3)
        assert 1.0 <= r["amdahl_ideal"] <= r["ideal"]
        # the toy ViT has 64 patches: K = int(64 (1 - r)) of them plus the never-dropped CLS token remain
        assert r["kept_token_fraction"] == round((int(64 * (1 - r["ratio"])) + 1) / 65, 4)
        assert 1.0 <= r["amdahl_ideal_kept_tokens"] <= r["amdahl_ideal"]
        q1, q3 = r["speedup_quartiles"]  # per-round speedups: 1 exactly for the baseline, else spread around it
        assert q1 <= q3 and ((q1, q3) == (1.0, 1.0) if r["ratio"] == 0 else q1 > 0)
    assert 0 < m["f_stem"] < 1
    assert "toy_cluster_ge_0.9_of_random" in res["targets"]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        bench_masking(models=("toy",), ratios=(0.0, 1.0))


def test_eval_masking_fast_same_budget_and_curves():
    from labkit.masking.study import eval_masking

    res = eval_masking(variants=("none", "cluster"), unmasked_tuning=0.25, progress=False, curve_points=2)
    assert [r["run"] for r in res["runs"]] == ["none", "cluster:0.5", "cluster:0.5+tuning"]
    assert [r["tuning_steps"] for r in res["runs"]] == [0, 0, max(1, round(0.25 * res["runs"][2]["planned_steps"]))]
    tuned = res["runs"][2]  # the budget may stop it early; what ran of its unmasked tail is recorded
    assert tuned["tuning_steps_done"] == max(0, tuned["steps"] - (tuned["planned_steps"] - tuned["tuning_steps"]))
    for run in res["runs"]:
        assert run["images_seen"] > 0 and run["curve"]
        assert 0.0 <= run["zero_shot_shape_acc"] <= 1.0 and 0.0 <= run["shape_acc_small"] <= 1.0
        assert run["train_seconds"] < res["budget_s_per_variant"] + 5  # stopped by the budget or its steps


def test_object_drop_rates_small_objects_vanish_more_often():
    from labkit.data.toyworld import ToyObject
    from labkit.masking.study import object_drop_rates, object_patches

    obj = ToyObject("circle", "red", "small", "center", 32.0, 32.0)
    assert sorted(object_patches(obj)) == [27, 28, 35, 36]  # a 12 px box centred on 4 patches
    rates = object_drop_rates("random", 0.75, n=300)
    assert rates["small"]["fully_dropped"] > rates["large"]["fully_dropped"]
    assert rates["small"]["mean_patches"] < rates["large"]["mean_patches"]


def test_viz_figures_draw(tmp_path):
    import matplotlib.pyplot as plt

    from labkit.masking import viz

    imgs = torch.rand(2, 3, 64, 64)
    keep, d = M.cluster_keep_indices(imgs, 8, 0.5, return_diagnostics=True)
    figs = [viz.cluster_steps_figure(imgs[0], {k: v[0] for k, v in d.items()}, 8, 0.68,
                                     sim=M.similarity_matrix(imgs[:1], 8)[0]),
            viz.masks_grid_figure(imgs, {"cluster": d["masked"]}, 8)]
    rows = [{"strategy": s, "ratio": r, "speedup": 1 + r, "ideal": 1 / (1 - r), "amdahl_ideal": 1 + r,
             "amdahl_ideal_kept_tokens": 1 + r - 0.1, "speedup_quartiles": [r + 0.9, r + 1.2]}
            for s in ("random", "cluster") for r in (0.5, 0.75)]
    figs.append(viz.throughput_figure({"device": "cpu", "dtype": "fp32", "optimizer": "AdamW (fused)", "models": [
        {"model": "toy", "batch": 8, "image_size": 64, "f_stem": 0.1, "rows": rows}]}))
    curve = [{"train_seconds": 1.0, "zero_shot_shape_acc": 0.3, "retrieval_i2t_r1": 0.1}]
    study = {"budget_s_per_variant": 1, "curve_n": 200, "eval_n": 1000,
             "runs": [{"run": "random:0.5", "masking": "random", "ratio": 0.5, "unmasked_tuning": 0.0, "curve": curve,
                       "shape_acc_small": 0.2, "shape_acc_large": 0.4}]}
    figs += [viz.accuracy_vs_time_figure(study), viz.size_accuracy_figure(study)]
    chance = [[line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == ":"] for ax in figs[-2].axes]
    assert chance == [[pytest.approx(1 / 6)], [pytest.approx(1 / 200)]]  # six shapes; one caption in the curve's 200
    assert [line.get_ydata()[0] for line in figs[-1].axes[0].lines] == [pytest.approx(1 / 6)]
    for i, fig in enumerate(figs):
        fig.savefig(tmp_path / f"{i}.png")
        plt.close(fig)
    with pytest.raises(ValueError, match="not divisible"):
        viz.draw_mask(plt.gca(), torch.rand(3, 60, 60), torch.zeros(49, dtype=torch.bool), 8)


def test_cli_bench_masking_json_last_line(capsys):
    import json

    from labkit.cli import main

    assert main(["bench", "masking", "--models", "toy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["models"][0]["model"] == "toy"
    assert main(["eval", "masking", "--ratio", "1.2", "--json"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def test_openclip_wrapper_installs_masking_and_dataset(tmp_path):
    from labkit.masking.openclip_train import TOY_ARCH, _with_masking, make_dataset, register_toy_arch

    info = make_dataset(tmp_path / "data", n=6)
    lines = (tmp_path / "data" / "train.csv").read_text().splitlines()
    assert info["images"] == 6 and lines[0] == "filepath\ttitle" and len(lines) == 7
    register_toy_arch()
    create = _with_masking(open_clip.create_model_and_transforms, "cluster", 0.5, {"anchor_ratio": 0.05})
    model, _, _ = create(TOY_ARCH)
    assert isinstance(model.visual.patch_dropout, M.PatchMasking)
    assert model.visual.patch_dropout.anchor_ratio == 0.05


@pytest.mark.slow
def test_openclip_train_two_processes_under_torchrun(tmp_path):
    """A few steps of open_clip's trainer with labkit masking, 2 CPU processes (gloo)."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("braceexpand", reason="open_clip_train needs open_clip_torch[training]")
    pytest.importorskip("webdataset", reason="open_clip_train needs open_clip_torch[training]")
    from labkit.masking.openclip_train import make_dataset

    make_dataset(tmp_path / "data", n=64)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        torchrun = shutil.which("torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "labkit.masking.openclip_train", "--masking", "cluster",
           "--mask-ratio", "0.5", "--", "--train-data", str(tmp_path / "data" / "train.csv"),
           "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", "labkit-ToyViT-8",
           "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--workers", "0", "--report-to", "none",
           "--logs", str(tmp_path / "logs"), "--name", "masked", "--warmup", "1", "--save-frequency", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "logs" / "masked" / "checkpoints").glob("epoch_1.pt"))


def test_cluster_masks_do_not_depend_on_autocast():
    """Under bf16 autocast (CUDA training), similarities and the kept sets stay those of fp32. At ViT-B-32's
    geometry (224 px, 32 px patches) bf16 similarities changed the kept set of 15 of these 64 images."""
    world = tw.ToyWorld("test", 0, 64)
    images = torch.from_numpy(np.stack([world.scene(i).render() for i in range(64)])).permute(0, 3, 1, 2).float() / 255
    images = torch.nn.functional.interpolate(images, size=224, mode="bilinear")
    for fill in ("random", "similarity"):
        fp32 = M.cluster_keep_indices(images, 32, 0.5, generator=torch.Generator().manual_seed(0), fill=fill)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = M.cluster_keep_indices(images, 32, 0.5, generator=torch.Generator().manual_seed(0), fill=fill)
            assert M.similarity_matrix(images, 32).dtype == torch.float32
        assert torch.equal(fp32, bf16)


def test_anchor_panel_outlines_the_patches_above_the_threshold():
    """Every patch above the threshold gets its own cyan box (not a contour that could circle the others)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from labkit.masking import viz

    score = torch.full((64,), -0.5)
    score[[0, 1, 9, 63]] = 0.9
    _, ax = plt.subplots()
    viz.draw_anchor_similarity(ax, torch.zeros(3, 64, 64), score, [0], 8, threshold=0.68)
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch() == "//"]
    assert sorted((round(b.get_x() + 0.5), round(b.get_y() + 0.5)) for b in boxes) == [(0, 0), (8, 0), (8, 8), (56, 56)]
    assert "4 of 64 patches" in ax.get_title()
    plt.close("all")


def test_the_study_chooses_on_validation_and_reports_on_test(monkeypatch):
    """A variant that is best on test but not on validation must not be called the best."""
    from labkit.masking import study

    def fake_evaluate(clip, n=1000, split="test"):
        hooked = isinstance(clip.model.visual.patch_dropout, M.PatchMasking)
        good = hooked if split == "test" else not hooked  # masking wins on test only
        value = 0.9 if good else 0.1
        return {"zero_shot_shape_acc": value, "zero_shot_color_acc": value, "retrieval_i2t_r1": value,
                "retrieval_t2i_r1": value}

    monkeypatch.setattr(study, "evaluate_clip", fake_evaluate)
    monkeypatch.setattr("labkit.clip.pretrain.evaluate_clip", fake_evaluate)
    result = study.eval_masking(budget_s=1.0, variants=("none", "random"), progress=False)
    runs = {r["masking"]: r for r in result["runs"]}
    assert runs["random"]["zero_shot_shape_acc"] == 0.9 and runs["none"]["val_shape_plus_i2t"] == 1.8
    assert result["best_by_shape_plus_i2t"] == "none"


def test_unmasked_tuning_steps_fill_the_same_budget(monkeypatch):
    """FLIP's unmasked tuning inside the budget: masked steps at their rate plus unmasked ones at theirs."""
    from labkit.masking.study import PLANNED_SHARE, plan_steps

    monkeypatch.setenv("LABKIT_FAST", "0")  # the full-size plan
    planned = PLANNED_SHARE * 100.0  # a margin, so that a slower run still reaches its tuning steps
    assert plan_steps(100.0, 10, masked_rate=50.0) == (int(planned * 50 / 10), 0)
    steps, tuning = plan_steps(100.0, 10, masked_rate=50.0, unmasked_rate=20.0, tuning=0.1)
    assert tuning == round(0.1 * steps)
    seconds = (steps - tuning) * 10 / 50.0 + tuning * 10 / 20.0
    assert seconds == pytest.approx(planned, abs=10 / 20.0)  # within one unmasked step of the planned time
    assert steps < int(planned * 50 / 10)  # the slower unmasked steps cost masked ones
    with pytest.raises(ValueError, match="share"):
        plan_steps(100.0, 10, 50.0, 20.0, tuning=1.0)
