"""The Tip-Adapter app: handlers called directly, then gradio_client against the app on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import main as m
from app import tipadapter_tab as tab
from app import uploads as up
from labkit.tipadapter import cache as tip

RED, BLUE, GREEN = (220, 30, 30), (30, 40, 220), (30, 200, 60)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A randomly initialised toy CLIP in local-dir layout: the app's plumbing does not need a trained one."""
    from labkit.clip.model import save_local_dir
    from labkit.clip.pretrain import new_toy_clip

    torch.manual_seed(0)
    clip = new_toy_clip(device="cpu")
    return "local-dir:" + str(save_local_dir(clip.model, clip.config, tmp_path_factory.mktemp("toy_clip")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Support images per class (squares of a colour on varied backgrounds) plus awkward files."""
    d = tmp_path_factory.mktemp("uploads")
    out = {}
    for name, color in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        paths = []
        for i in range(4):
            img = Image.new("RGB", (90 + 10 * i, 70), (120 + 20 * i,) * 3)
            img.paste(color, (10 + 5 * i, 10, 60 + 5 * i, 60))
            paths.append(str(d / f"{name}_{i}.png"))
            img.save(paths[-1])
        out[name] = paths
    (d / "notes.txt").write_text("not an image at all")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    good = Path(out["red"][0]).read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    out["dir"] = d
    return out


def slots(names, files):
    names = list(names) + [""] * (tab.MAX_CLASSES - len(names))
    files = list(files) + [None] * (tab.MAX_CLASSES - len(files))
    return names, files


# ---------------------------------------------------------------- decoding uploads

@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    src = Image.new("RGBA", (40, 30), (200, 10, 10, 0))
    src.paste((200, 10, 10, 255), (0, 0, 20, 30))
    img = src.convert(mode) if mode != "I;16" else Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40))
    path = tmp_path / f"x.{'tiff' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = up.load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "RGBA":  # transparent pixels composited on white, opaque ones kept
        assert out.getpixel((35, 5)) == (255, 255, 255) and out.getpixel((5, 5)) == (200, 10, 10)


def test_load_image_rejects_bad_files_with_clear_messages(images, monkeypatch):
    d = images["dir"]
    for name in ("notes.txt", "corrupt.png", "truncated.png"):
        with pytest.raises(ValueError, match="not a readable image"):
            up.load_image(d / name)
    with pytest.raises(ValueError, match="cannot read"):
        up.load_image(d / "missing.png")
    monkeypatch.setattr(up, "MAX_PIXELS", 5000)
    with pytest.raises(ValueError, match="megapixels"):
        up.load_image(images["red"][0])
    monkeypatch.setattr(up, "MAX_FILE_BYTES", 100)
    with pytest.raises(ValueError, match="upload limit"):
        up.load_image(images["red"][0])


def test_big_images_are_downscaled(tmp_path):
    Image.new("RGB", (3000, 2000), RED).save(tmp_path / "big.jpg", quality=80)
    out = up.load_image(tmp_path / "big.jpg")
    assert max(out.size) <= up.WORK_SIDE and out.getpixel((10, 10))[0] > 200
    assert up.to_tensor(out, 64).shape == (3, 64, 64)


# ---------------------------------------------------------------- support sets from uploads

@pytest.mark.parametrize("names,files,shots,message", [
    (["red", "blue"], [["R"], []], 1, "'blue' has no usable images"),
    (["red"], [["R"]], 1, "at least 2 classes"),
    (["red", ""], [["R"], ["B"]], 1, "empty name"),
    (["red", "Red "], [["R"], ["B"]], 1, "duplicate class names"),
    (["red", "blue"], [["R"], ["B"]], 2, "fewer than shots=2"),
    (["red", "blue"], [["R"], ["B"]], 0, "between 1 and"),
    ([], [], 1, "at least 2 classes"),
])
def test_bad_support_uploads_are_rejected(images, names, files, shots, message):
    real = {"R": images["red"][0], "B": images["blue"][0]}
    files = [[real[f] for f in fs] for fs in files]
    with pytest.raises(ValueError, match=message):
        up.support_from_uploads(*slots(names, files), shots, 64)


def test_uploads_with_a_corrupt_image_are_rejected(images):
    names, files = slots(["red", "blue"], [images["red"][:1], [str(images["dir"] / "corrupt.png")]])
    with pytest.raises(ValueError, match="corrupt.png"):
        up.support_from_uploads(names, files, 1, 64)


def test_support_from_uploads_takes_the_first_shots(images):
    names, files = slots(["red", "", "blue"], [images["red"], None, images["blue"]])
    imgs, labels, classnames, skipped = up.support_from_uploads(names, files, 3, 64)
    assert imgs.shape == (6, 3, 64, 64) and imgs.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and classnames == ("red", "blue") and skipped == []


def test_an_over_limit_file_is_named_and_the_valid_files_are_kept(images, tmp_path):
    big = tmp_path / "huge_photo.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (up.MAX_FILE_BYTES + 1024))
    names, files = slots(["red", "blue"], [[str(big), *images["red"]], images["blue"]])
    imgs, labels, _, skipped = up.support_from_uploads(names, files, 3, 64)
    assert len(imgs) == 6 and len(skipped) == 1 and skipped[0].startswith("huge_photo.png (5.0 MB")
    names, files = slots(["red", "blue"], [[str(big), *images["red"][:2]], images["blue"]])
    with pytest.raises(ValueError, match="2 usable image.*skipped: huge_photo.png"):
        up.support_from_uploads(names, files, 3, 64)



# ---------------------------------------------------------------- the Tip-Adapter tab's handlers

@pytest.fixture(scope="module")
def session(model, images):
    names, files = slots(["red", "blue", "green"], [images["red"], images["blue"], images["green"]])
    return tab.on_build(None, model, tab.SOURCES[1], "", 3, *names, *files)[0]


def test_build_then_bad_build_keeps_the_previous_cache(model, images, session, caplog):
    assert session["cache"].classnames == ("red", "blue", "green") and len(session["cache"].keys) == 9
    bad_inputs = [
        slots(["red"], [images["red"]]),  # a single class
        slots(["red", "blue"], [images["red"], []]),  # a class with no images
        slots(["red", "red"], [images["red"], images["blue"]]),  # duplicate names
        slots(["red", "blue"], [images["red"], [str(images["dir"] / "notes.txt")] * 4]),  # a non-image
    ]
    for names, files in bad_inputs:
        with caplog.at_level("INFO", logger="labkit.app"):
            state, status, *rest = tab.on_build(session, model, tab.SOURCES[1], "", 3, *names, *files)
        assert state is session and "previous cache is kept" in status
        assert all(x == tab.gr.skip() for x in rest)
    # every error a student hits is logged at INFO, with its message
    assert [r.levelname for r in caplog.records] == ["INFO"] * 4 and "at least 2 classes" in caplog.records[0].message
    state, status, *_ = tab.on_build(session, "openclip:NoSuchArch/none", tab.SOURCES[1], "", 3, *bad_inputs[0][0],
                                     *bad_inputs[0][1])
    assert state is session and "unknown open_clip architecture" in status


def test_score_is_tip_adapter_at_its_true_scale(session):
    clip = tab.get_model(session["model"])
    f = torch.nn.functional.normalize(torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(0)), dim=0)
    cache = session["cache"]
    r = tab.score(session, f, 3.0, 4.0)
    logits = tip.tip_logits(f[None], session["classifier"], cache.keys, cache.values, 3.0, 4.0)[0]
    torch.testing.assert_close(r["fused"], logits.softmax(-1))
    # the cache part is alpha times the vote, not a renormalised share: it vanishes as beta grows
    vote = torch.exp(-4.0 * (1 - f @ cache.keys.T)) @ cache.values
    torch.testing.assert_close(r["cache_logits"], 3.0 * vote)
    torch.testing.assert_close(r["zero_shot_logits"] + r["cache_logits"], logits)
    assert float(tab.score(session, f, 3.0, 200.0)["cache_logits"].abs().max()) < 1e-6
    torch.testing.assert_close(tab.score(session, f, 0.0, 4.0)["fused"], r["zero_shot"])  # alpha 0: zero-shot CLIP
    assert r["label"] == cache.classnames[int(logits.argmax())]
    assert [a for _, _, a in r["nearest"]] == sorted((a for _, _, a in r["nearest"]), reverse=True)
    assert "α·cache" in tab.logits_html(r, 3.0) and all(c in tab.logits_html(r, 3.0) for c in cache.classnames)


def test_the_alpha_slider_is_logarithmic_and_covers_the_search_grid():
    assert tab.alpha_of(tab.LOG_ALPHA_MIN) == 0.0 and tab.alpha_of(2.0) == pytest.approx(100.0)
    assert tab.alpha_of(tab.LOG_ALPHA_MAX) >= max(tip.DEFAULT_ALPHAS)
    for a in tip.DEFAULT_ALPHAS:
        assert tab.alpha_of(tab.log_alpha_of(a)) == pytest.approx(a, rel=1e-9)


def test_classify_batch_mixes_good_and_bad_requests(session, images):
    red, bad = images["red"][1], str(images["dir"] / "notes.txt")
    states = [session, session, None, session]
    out = tab.classify_batch(states, [red, bad, red, None], [0.7] * 4, [5.0] * 4)
    labels, statuses, new_states = out[0], out[-2], out[-1]
    assert len(out) == tab.N_RESULT + 2 and all(len(col) == 4 for col in out)
    assert statuses[0].startswith("Prediction") and set(labels[0]) == {"red", "blue", "green"}
    assert "not a readable image" in statuses[1] and "build a cache first" in statuses[2]
    assert "upload a query" in statuses[3]
    # a failed request clears the result boxes: no stale prediction next to the new query
    assert [out[k][1] for k in range(tab.N_RESULT)] == list(tab.CLEARED)
    assert new_states[1] is session and new_states[0]["query"] is not None
    single = tab.classify_batch([session], [red], [0.7], [5.0])
    assert single[0][0] == pytest.approx(labels[0])  # batching does not change a result


def test_sliders_rescore_without_reencoding(session, images):
    state = tab.classify_batch([session], [images["blue"][0]], [0.0], [1.0])[-1][0]
    low, high = tab.on_rescore(state, tab.LOG_ALPHA_MIN, 1.0), tab.on_rescore(state, 2.5, 8.0)
    assert low[0] != high[0] and "alpha=0," in low[3] and "alpha=316" in high[3]
    assert all(x == tab.gr.skip() for x in tab.on_rescore(None, 1.0, 1.0))


def test_builtin_task_sets_alpha_beta_from_validation_and_never_reads_test(model, monkeypatch):
    roles = []
    real = tab.tip_eval.task_data
    monkeypatch.setattr(tab.tip_eval, "task_data", lambda task, role, n: roles.append(role) or real(task, role, n))
    tab._task_split.cache_clear()
    tab._val_features.cache_clear()
    out = tab.on_build(None, model, tab.SOURCES[0], tab.DEFAULT_TASK, 2, *[""] * 6, *[None] * 6)
    state, status, log_alpha, beta, val = out[0], out[1], out[4], out[5], out[6]
    assert state["task"] == "novel" and sorted(set(roles)) == ["support", "val"]
    # the search's choice, recomputed independently on the validation features
    feats, labels = tab._val_features(model, "novel")
    search = tip.search_alpha_beta(feats, labels, state["classifier"], state["cache"].keys, state["cache"].values)
    assert tab.alpha_of(log_alpha) == pytest.approx(search["alpha"], rel=1e-6) and beta == search["beta"]
    assert "validation search" in status and f"{search['accuracy']:.3f}" in val
    want = tip.accuracy(tip.tip_logits(feats, state["classifier"], state["cache"].keys, state["cache"].values,
                                       10.0, 3.0), labels)
    assert tab.val_accuracy(state, 10.0, 3.0) == pytest.approx(want)
    assert f"**{want:.3f}** at alpha = 10" in tab.on_rescore(state, 1.0, 3.0)[-1]
    # a random query keeps its true class through slider moves
    picked = tab.on_pick_query(state, log_alpha, beta, 0)
    assert "true class" in picked[tab.N_RESULT] and picked[-1] == 1 and "data:image/png" in picked[-2]
    assert "true class" in tab.on_rescore(picked[tab.N_RESULT + 1], 0.5, 2.0)[tab.N_RESULT]
    assert "test" in roles  # only the random query read the test split
    with pytest.raises(ValueError, match="unknown built-in task"):
        tab.build_session(model, tab.SOURCES[0], "ImageNet", 2)


def test_uploads_left_while_building_a_builtin_task_get_a_warning(model, images):
    names, files = slots(["red"], [images["red"]])
    status = tab.on_build(None, model, tab.SOURCES[0], "ToyWorld colours", 1, *names, *files)[1]
    assert "4 uploaded image(s) ignored" in status and "Cache built" in status


def test_my_images_opens_its_panel_and_disables_the_task_list():
    panel, task = tab.on_source(tab.SOURCES[1])
    assert panel["visible"] is True and task["interactive"] is False
    panel, task = tab.on_source(tab.SOURCES[0])
    assert panel["visible"] is False and task["interactive"] is True


# ---------------------------------------------------------------- the other tabs' handlers

def test_masking_tab_compares_random_and_cluster_at_the_same_ratio():
    from app import masking_tab as mt
    from labkit.masking import masks

    for choice, n in (("chelsea", 196), ("ToyWorld scene 1", 64)):
        image, patch, _ = mt.load_choice(choice, None)
        r = mt.compare(image, patch, 0.6, 0.05, 0.6)
        assert r["n_patches"] == n and r["kept"] == masks.num_keep(n, 0.6)
        for kind in ("random", "cluster"):
            assert int((~r[kind]).sum()) == r["kept"]  # both keep exactly the same count
    pair, steps, info = mt.on_masks("coffee", None, 0.75, 0.03, 0.68, 0)
    assert pair is not None and steps is not None and "**49 of 196 patches kept**" in info and "3.94x" in info
    for bad, message in (((1.0, 0.03, 0.68), "mask ratio must be in [0, 1)"), ((0.5, 0.0, 0.68), "anchor ratio"),
                         ((0.5, 0.03, 1.5), "threshold")):
        assert mt.on_masks("coffee", None, *bad, 0)[:2] == (None, None)
        assert message in mt.on_masks("coffee", None, *bad, 0)[2]
    assert "upload an image first" in mt.on_masks(mt.CHOICES[-1], None, 0.5, 0.03, 0.68, 0)[2]


def test_blip2_tab_is_the_shipped_pipeline():
    from app import blip2_tab as bt
    from labkit.blip2.data import render
    from labkit.blip2.eval import answer_and_caption
    from labkit.data.tokenizer import EOT

    scene = bt.make_scene("random scene", 5, [])
    question, truth = scene.questions()[1]
    out = bt.ask("t5", scene, question)
    # the same answer as the lab's evaluation path gives for this scene and question
    model, encoder = bt._PIPELINES["t5"](), bt.ENCODER()
    feats, eos = encoder(render([scene])), bt.tokenizer().ids[EOT]
    ref = answer_and_caption(lambda idx, ids, mask, k: model.generate(feats[idx], ids, mask, k, eos), [scene])
    assert out["answer"] == next(r["pred"] for r in ref["qa"] if r["question"] == question)
    assert out["caption"] == ref["captions"][0] and out["truth"] == truth
    assert out["maps"].shape == (16, 8, 8) and torch.allclose(out["maps"].sum((1, 2)), torch.ones(16), atol=1e-4)
    built = bt.make_scene("my objects", 0, [("circle", "red", "large", "top left"), (bt.NONE, "red", "large", "top")])
    assert [(o.shape, o.color, o.position) for o in built.objects] == [("circle", "red", "top left")]
    for q, message in (("", "type a question"), ("what colour is the banana?", "'banana'")):
        html, text, fig = bt.on_ask("T5 (encoder-decoder)", "random scene", 0, q, *["circle", "red", "large", "top"] * 3)
        assert (html, fig) == ("", None) and message in text
    text = bt.on_ask("T5 (encoder-decoder)", "my objects", 0, "how many objects?",
                     "circle", "red", "large", "top", "square", "red", "large", "top", bt.NONE, "red", "large", "top")[1]
    assert "share a position" in text


def test_efficientvlm_tab_scores_the_three_shipped_models():
    from app import efficientvlm_tab as et

    r = et.compare(3, et.CAPTIONS[0], "")
    clip, vlms = et.CLIP(), et._VLMS()
    images = clip.prepare(torch.from_numpy(r["scene"].render().copy()).permute(2, 0, 1)[None])
    for name, vlm in vlms.items():
        want = float(vlm.match_scores(images, et.trim_padding(clip.tokenize([r["caption"]])))[0])
        assert r["scores"][name] == pytest.approx(want, abs=1e-6) and r["ms"][name] > 0
    assert r["params"]["pruned"] < r["params"]["student"] < r["params"]["teacher"]
    negative = et.compare(3, et.CAPTIONS[1], "")
    assert negative["caption"] != r["caption"]
    gates = et.gate_map(vlms["pruned"], vlms["student"])
    assert {k: int(v.sum()) for k, v in gates.items()} == vlms["pruned"].sizes()
    for args, message in (((0, et.CAPTIONS[2], "a purple banana"), "'banana'"), ((-1, et.CAPTIONS[0], ""), "seed"),
                          ((0, et.CAPTIONS[2], " "), "type a caption")):
        assert message in et.on_compare(*args)[1] and et.on_compare(*args)[3] is None


# ---------------------------------------------------------------- the app served on 127.0.0.1

@pytest.fixture(scope="module")
def served(model):
    """The demo served on a free local port, and a gradio_client Client talking to it."""
    from gradio_client import Client

    from app.bench import free_port

    demo = m.build_demo(model)
    port = free_port()
    _, url, _ = m.serve(demo, "127.0.0.1", port, block=False)
    yield demo, Client(url, verbose=False, download_files=False, analytics_enabled=False)
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return served[1]


def test_the_queue_does_not_rebuild_its_latency_summary_after_every_event(model, monkeypatch):
    """Gradio's default rebuilds a DataFrame of up to 10,000 past events after each one; the app's queue does not."""
    queue = m.build_demo(model)._queue
    monkeypatch.setattr(type(queue), "_get_df", staticmethod(lambda records: pytest.fail("summary rebuilt")))
    for _ in range(100):
        queue.events_recorded += 1
        queue.compute_analytics_summary([{"function": "classify", "status": "success", "process_time": 0.1}])


def test_the_demo_is_served_with_uvicorns_compiled_http_parser_and_event_loop(served):
    """httptools and uvloop (dependencies of the lab) serve a third more requests per second than h11 and asyncio."""
    from app.bench import server_stack

    demo, _ = served
    assert demo.server.config.http_protocol_class.__name__ == "HttpToolsProtocol"
    expected_loop = "asyncio" if sys.platform == "win32" else "uvloop"
    assert type(demo.server.servers[0].get_loop()).__module__.split(".")[0] == expected_loop
    assert server_stack() == {"http": "HttpToolsProtocol", "event_loop": expected_loop}


def test_gradio_client_round_trip(client, model, images):
    from gradio_client import handle_file

    names, files = slots(["red", "blue"], [[handle_file(p) for p in images["red"]],
                                           [handle_file(p) for p in images["blue"]]])
    status = client.predict(model, tab.SOURCES[1], "ToyWorld shapes", 2, *names, *files, api_name="/build_cache")[0]
    assert "Cache built:** 2 classes" in status
    out = client.predict(handle_file(images["red"][2]), 0.7, 5.0, api_name="/classify")
    assert out[-1].startswith("Prediction") and out[0]["label"] in ("red", "blue") and "affinity" in out[2]
    # bad requests get messages, and the cache survives them
    out = client.predict(handle_file(str(images["dir"] / "corrupt.png")), 0.7, 5.0, api_name="/classify")
    assert "not a readable image" in out[-1] and out[1] == ""
    names, files = slots(["red"], [[handle_file(p) for p in images["red"]]])
    status = client.predict(model, tab.SOURCES[1], "ToyWorld shapes", 2, *names, *files, api_name="/build_cache")[0]
    assert "at least 2 classes" in status and "previous cache is kept" in status
    out = client.predict(handle_file(images["blue"][3]), 0.7, 5.0, api_name="/classify")
    assert out[-1].startswith("Prediction") and {c["label"] for c in out[0]["confidences"]} == {"red", "blue"}


def test_builtin_task_over_the_api(client, model):
    out = client.predict(model, tab.SOURCES[0], "MNIST digits (real, out of domain)", 1, *[""] * 6, *[None] * 6,
                         api_name="/build_cache")
    assert "10 classes × 1 shots" in out[0] and "validation search" in out[0]
    pick = client.predict(out[3], out[4], 3, api_name="/pick_query")
    assert "true class" in pick[tab.N_RESULT]


def test_other_tabs_over_the_api(client):
    info = client.predict("rocket", None, 0.5, 0.03, 0.68, 0, api_name="/masks")[2]
    assert "**98 of 196 patches kept**" in info
    assert "upload an image first" in client.predict("My image (upload)", None, 0.5, 0.03, 0.68, 0, api_name="/masks")[2]
    with pytest.raises(Exception, match="greater than maximum value 0.95"):  # the slider's own bound, a clear message
        client.predict("rocket", None, 1.0, 0.03, 0.68, 0, api_name="/masks")
    objects = ["circle", "red", "large", "top left"] * 3
    answer = client.predict("T5 (encoder-decoder)", "random scene", 2, "how many objects are there?", *objects,
                            api_name="/blip2_ask")[1]
    assert "**A:**" in answer and "true answer" in answer
    assert "'banana'" in client.predict("T5 (encoder-decoder)", "random scene", 2, "is it a banana?", *objects,
                                        api_name="/blip2_ask")[1]
    out = client.predict(1, "true caption", "", api_name="/efficientvlm_compare")
    assert "P(match)" in out[2] and "pruned" in out[2]
    assert "type a caption" in client.predict(1, "my caption", "", api_name="/efficientvlm_compare")[1]


def test_uploads_over_the_server_cap_are_refused(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(26 * 1024 * 1024)  # over UPLOAD_LIMIT (25 MB)
    with pytest.raises(Exception, match="(?i)size|large|413|limit"):
        client.predict(handle_file(str(big)), 1.0, 1.0, api_name="/classify")
