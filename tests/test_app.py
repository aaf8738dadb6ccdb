"""The Tip-Adapter app: handlers called directly, then gradio_client against the app on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import main as m
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
    names = list(names) + [""] * (m.MAX_CLASSES - len(names))
    files = list(files) + [None] * (m.MAX_CLASSES - len(files))
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
    (["red", "blue"], [["R"], []], 1, "'blue' has no images"),
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
    imgs, labels, classnames = up.support_from_uploads(names, files, 3, 64)
    assert imgs.shape == (6, 3, 64, 64) and imgs.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and classnames == ("red", "blue")


# ---------------------------------------------------------------- handlers

@pytest.fixture(scope="module")
def session(model, images):
    names, files = slots(["red", "blue", "green"], [images["red"], images["blue"], images["green"]])
    return m.on_build(None, model, m.SOURCES[1], "", 3, *names, *files)[0]


def test_build_then_bad_build_keeps_the_previous_cache(model, images, session):
    assert session["cache"].classnames == ("red", "blue", "green") and len(session["cache"].keys) == 9
    bad_inputs = [
        slots(["red"], [images["red"]]),  # a single class
        slots(["red", "blue"], [images["red"], []]),  # a class with no images
        slots(["red", "red"], [images["red"], images["blue"]]),  # duplicate names
        slots(["red", "blue"], [images["red"], [str(images["dir"] / "notes.txt")] * 4]),  # a non-image
    ]
    for names, files in bad_inputs:
        state, status, gallery, fig = m.on_build(session, model, m.SOURCES[1], "", 3, *names, *files)
        assert state is session and "previous cache is kept" in status
        assert gallery == m.gr.skip() and fig == m.gr.skip()
    state, status, *_ = m.on_build(session, "openclip:NoSuchArch/none", m.SOURCES[1], "", 3, *bad_inputs[0][0],
                                   *bad_inputs[0][1])
    assert state is session and "unknown open_clip architecture" in status


def test_score_is_tip_adapter(session):
    clip = m.get_model(session["model"])
    f = torch.nn.functional.normalize(torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(0)), dim=0)
    cache = session["cache"]
    r = m.score(session, f, 3.0, 4.0)
    expected = tip.tip_logits(f[None], session["classifier"], cache.keys, cache.values, 3.0, 4.0)[0].softmax(-1)
    torch.testing.assert_close(r["fused"], expected)
    torch.testing.assert_close(m.score(session, f, 0.0, 4.0)["fused"], r["zero_shot"])  # alpha 0: zero-shot CLIP
    assert r["label"] == cache.classnames[int(expected.argmax())]
    assert [a for _, _, a in r["nearest"]] == sorted((a for _, _, a in r["nearest"]), reverse=True)


def test_classify_batch_mixes_good_and_bad_requests(session, images):
    red, bad = images["red"][1], str(images["dir"] / "notes.txt")
    states = [session, session, None, session]
    out = m.classify_batch(states, [red, bad, red, None], [5.0] * 4, [5.0] * 4)
    labels, statuses, new_states = out[0], out[-2], out[-1]
    assert len(out) == m.N_RESULT + 2 and all(len(col) == 4 for col in out)
    assert statuses[0].startswith("Prediction") and set(labels[0]) == {"red", "blue", "green"}
    assert "not a readable image" in statuses[1] and "build a cache first" in statuses[2]
    assert "upload a query" in statuses[3]
    assert new_states[1] is session and new_states[0]["query"] is not None
    single = m.classify_batch([session], [red], [5.0], [5.0])
    assert single[0][0] == pytest.approx(labels[0])  # batching does not change a result


def test_sliders_rescore_without_reencoding(session, images):
    state = m.classify_batch([session], [images["blue"][0]], [1.0], [1.0])[-1][0]
    low, high = m.on_rescore(state, 0.0, 1.0), m.on_rescore(state, 50.0, 8.0)
    assert low[0] != high[0]
    assert all(x == m.gr.skip() for x in m.on_rescore(None, 1.0, 1.0))


def test_builtin_task_and_random_query(model):
    state = m.on_build(None, model, m.SOURCES[0], "ToyWorld colours", 2, *[""] * 6, *[None] * 6)[0]
    assert state["task"] == "color" and len(state["cache"].keys) == 16
    out = m.on_pick_query(state, 1.0, 1.0, 0)
    assert "true class" in out[m.N_RESULT] and out[-1] == 1 and out[-2].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="unknown built-in task"):
        m.build_session(model, m.SOURCES[0], "ImageNet", 2)


# ---------------------------------------------------------------- the app served on 127.0.0.1

@pytest.fixture(scope="module")
def client(model):
    from gradio_client import Client

    from app.bench import free_port

    demo = m.build_demo(model)
    port = free_port()
    _, url, _ = m.serve(demo, "127.0.0.1", port, block=False)
    yield Client(url, verbose=False, download_files=False, analytics_enabled=False)
    demo.close()


def test_gradio_client_round_trip(client, model, images):
    from gradio_client import handle_file

    names, files = slots(["red", "blue"], [[handle_file(p) for p in images["red"]],
                                           [handle_file(p) for p in images["blue"]]])
    status = client.predict(model, m.SOURCES[1], "ToyWorld shapes", 2, *names, *files, api_name="/build_cache")[0]
    assert "Cache built:** 2 classes" in status
    out = client.predict(handle_file(images["red"][2]), 5.0, 5.0, api_name="/classify")
    assert out[-1].startswith("Prediction") and out[0]["label"] in ("red", "blue")
    # bad requests get messages, and the cache survives them
    out = client.predict(handle_file(str(images["dir"] / "corrupt.png")), 5.0, 5.0, api_name="/classify")
    assert "not a readable image" in out[-1]
    names, files = slots(["red"], [[handle_file(p) for p in images["red"]]])
    status = client.predict(model, m.SOURCES[1], "ToyWorld shapes", 2, *names, *files, api_name="/build_cache")[0]
    assert "at least 2 classes" in status and "previous cache is kept" in status
    out = client.predict(handle_file(images["blue"][3]), 5.0, 5.0, api_name="/classify")
    assert out[-1].startswith("Prediction") and {c["label"] for c in out[0]["confidences"]} == {"red", "blue"}


def test_builtin_task_over_the_api(client, model):
    status = client.predict(model, m.SOURCES[0], "MNIST digits (real, out of domain)", 1, *[""] * 6, *[None] * 6,
                            api_name="/build_cache")[0]
    assert "10 classes × 1 shots" in status
    out = client.predict(1.0, 1.0, 3, api_name="/pick_query")
    assert "true class" in out[m.N_RESULT]


def test_uploads_over_the_size_limit_are_refused(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (up.MAX_FILE_BYTES + 1024))
    with pytest.raises(Exception, match="(?i)size|large|413|limit"):
        client.predict(handle_file(str(big)), 1.0, 1.0, api_name="/classify")
