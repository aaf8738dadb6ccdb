import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from labkit.cli import main
from labkit.clip.model import load_clip
from labkit.data import toyworld as tw


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_eval_clip_prints_one_json_object_on_its_last_line():
    result = run_cli("eval", "clip", "--n", "100", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("zero_shot_shape_acc", "zero_shot_color_acc", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert 0.0 <= metrics[key] <= 1.0
    # the same figures recomputed here from the model's encoders, one class and one scene at a time
    clip = load_clip("toy", device="cpu")
    with torch.no_grad():
        for task in ("shape", "color"):
            data = tw.TaskDataset(task, "test", 0, 100)
            images, labels = data.tensors()
            classes = []
            for name in data.task.classnames:  # CLIP's prompt ensemble: mean of unit prompt features, renormalised
                prompts = torch.nn.functional.normalize(clip.encode_text([t.format(name) for t in data.task.templates]), dim=-1)
                classes.append(torch.nn.functional.normalize(prompts.mean(0), dim=-1))
            pred = (clip.encode_image(images) @ torch.stack(classes).T).argmax(1)
            assert metrics[f"zero_shot_{task}_acc"] == pytest.approx((pred == labels).float().mean().item(), abs=1e-6)
        world = tw.ToyWorld("test", 0, 100, objects=(2, 3), canonical_captions=True)
        scenes = [world.scene(i) for i in range(100)]
        image = clip.encode_image(torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2))
        text = clip.encode_text([s.caption() for s in scenes])
        hits = sum(int((image[i] @ text.T).argmax() == i) for i in range(100))
    assert metrics["retrieval_i2t_r1"] == pytest.approx(hits / 100, abs=1e-6)


def test_bench_toyworld_json(capsys):
    assert main(["bench", "toyworld", "--n", "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images_per_s"] > 0 and result["times_faster_than_training"] > 1


def test_user_errors_get_a_message_not_a_traceback():
    result = run_cli("eval", "clip", "--model", "no-such-model", "--json")
    assert result.returncode == 2
    assert "unknown model name 'no-such-model'" in result.stderr and "Traceback" not in result.stderr


def test_train_clip_fast_mode_writes_a_loadable_local_dir(tmp_path, capsys):
    out, work = tmp_path / "clip", tmp_path / "work"
    assert main(["train", "clip", "--steps", "3", "--batch-size", "16", "--eval-every", "0", "--eval-n", "0",
                 "--out", str(out), "--work-dir", str(work), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 3
    from labkit.clip.model import load_clip

    clip = load_clip(f"local-dir:{out}", device="cpu")
    assert clip.metadata["steps"] == 3


def test_train_pruned_fast_mode_prunes_recovers_and_saves(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LABKIT_FAST", "1")
    out = tmp_path / "pruned"
    assert main(["train", "pruned", "--recover-steps", "2", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 3 and 0.0 <= result["retrieval_r1"] <= 1.0
    from labkit.efficientvlm.model import load_vlm

    model = load_vlm(out)
    assert model.meta["recover_steps"] == 2 and set(model.meta["sparsity_by_modality"]) == {"vision", "text", "fusion"}
    assert model.meta["dual_restart"] is True
    assert main(["train", "pruned", "--plain-lagrangian", "--recover-steps", "0", "--out", str(out), "--json"]) == 0
    assert load_vlm(out).meta["dual_restart"] is False
    assert main(["train", "pruned", "--recover-steps", "-1", "--out", str(out), "--json"]) == 2
    assert "recover_steps must be >= 0" in capsys.readouterr().err


def test_train_student_fast_mode_continues_from_a_student_and_rejects_a_non_student(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LABKIT_FAST", "1")
    from labkit.core.assets import asset_dir
    from labkit.efficientvlm.model import load_vlm

    out = tmp_path / "student"
    shipped = asset_dir("efficientvlm/student")
    assert main(["train", "student", "--init", str(shipped), "--seed", "1", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    model = load_vlm(out)
    assert model.meta["init_from"]["steps"] == load_vlm(shipped).meta["steps"]
    teacher = str(asset_dir("efficientvlm/teacher"))
    assert main(["train", "student", "--init", teacher, "--out", str(out), "--json"]) == 2
    assert "not half of the teacher's" in capsys.readouterr().err
