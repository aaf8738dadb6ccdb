"""``labkit fetch``: the one command that touches the network. Offline it fails fast with a clear message; with the
hub client patched, it asks for exactly the repository and files the model needs; an unknown name never gets
as far as the network."""

import time

import pytest

import labkit.fetch as fetch_module
from labkit.cli import main


def test_offline_fetch_fails_within_seconds_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert main(["fetch", "Salesforce/blip2-opt-2.7b"]) == 2
    assert time.perf_counter() - started < 5
    assert "HF_HUB_OFFLINE is set, so labkit fetch cannot download" in capsys.readouterr().err


@pytest.fixture
def patched_hub(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(fetch_module.socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda s: None})())
    import huggingface_hub

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, list(allow_patterns)))
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_fetch_asks_for_the_open_clip_repository_and_its_weights(patched_hub):
    result = fetch_module.fetch("openclip:ViT-B-32/laion2b_s34b_b79k")
    repo, patterns = patched_hub[0]
    assert repo == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and result["repository"] == repo
    assert patterns[0] == "open_clip_model.safetensors" and "open_clip_config.json" in patterns


def test_fetch_asks_for_a_blip2_repository_and_only_safetensors_weights(patched_hub):
    fetch_module.fetch("Salesforce/blip2-flan-t5-xl")
    repo, patterns = patched_hub[0]
    assert repo == "Salesforce/blip2-flan-t5-xl"
    assert {"config.json", "model.safetensors", "model-*.safetensors", "preprocessor_config.json"} <= set(patterns)
    assert not any(p.endswith(".bin") for p in patterns)


@pytest.mark.parametrize("name", ["foo/bar", "openclip:ViT-B-32", "openclip:ViT-B-32/no_such_tag"])
def test_unknown_names_are_rejected_before_any_network_access(monkeypatch, capsys, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(fetch_module.socket, "create_connection", lambda *a, **k: pytest.fail("network touched"))
    assert main(["fetch", name]) == 2
    assert "labkit: error:" in capsys.readouterr().err
