import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from labkit.core.checkpoint import ModelError
from labkit.core.train import TrainConfig, fit, load_train_state, lr_lambda, shorten, steady_images_per_s


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def make_batch(step, rank=0, world=1):
    g = torch.Generator().manual_seed(step * world + rank)
    x = torch.randn(32, 4, generator=g)
    return (x, x.sum(dim=1, keepdim=True)), 32


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def run(steps, out_dir=None, total=None, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    cfg = TrainConfig(steps=total or steps, lr=1e-2, out_dir=out_dir, warmup=0.1, seed=seed, fast_steps=10**6)
    if total:  # stop early at `steps`, as if interrupted
        cfg.checkpoint_every = steps
        cfg.time_budget_s = None
    record = fit(model, mse, lambda s, r, w: make_batch(s, r, w) if s < steps or not total else (_ for _ in ()).throw(
        KeyboardInterrupt), cfg, progress=False)
    return model, record


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) < f(10) and f(99) < 0.01


def test_fit_learns_and_records_history():
    model, record = run(60)
    losses = [h["loss"] for h in record["history"]]
    assert len(losses) == 60 and record["steps"] == 60
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    assert all(h["images_per_s"] > 0 for h in record["history"])
    assert record["images_per_s"] == steady_images_per_s(record["history"]) > 0


def test_fast_mode_is_decided_in_fit_from_fast_steps(monkeypatch):
    torch.manual_seed(0)
    cfg = TrainConfig(steps=50, lr=1e-2, fast_steps=4)
    monkeypatch.setenv("LABKIT_FAST", "1")
    assert fit(Tiny(), mse, make_batch, cfg, progress=False)["steps"] == 4
    monkeypatch.setenv("LABKIT_FAST", "0")
    assert fit(Tiny(), mse, make_batch, TrainConfig(steps=6, lr=1e-2, fast_steps=4), progress=False)["steps"] == 6
    assert shorten(1000, 20) == 1000
    monkeypatch.setenv("LABKIT_FAST", "1")
    assert shorten(1000, 20) == 20 and shorten(5, 20) == 5


def test_steady_throughput_leaves_out_the_warm_up_tenth():
    history = [{"images_per_s": 1.0}] * 10 + [{"images_per_s": 100.0}] * 80 + [{"images_per_s": 90.0}] * 10
    assert steady_images_per_s(history) == 100.0  # the slow first tenth is not counted
    assert steady_images_per_s([{"images_per_s": 5.0}]) == 5.0 and steady_images_per_s([]) == 0.0


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight, _ = run(12)
    with pytest.raises(KeyboardInterrupt):  # interrupted after the checkpoint at step 6
        run(6, out_dir=tmp_path, total=12)
    torch.manual_seed(123)  # a different init: resume must overwrite it
    resumed = Tiny()
    record = fit(resumed, mse, make_batch, TrainConfig(steps=12, lr=1e-2, out_dir=str(tmp_path), warmup=0.1),
                 progress=False)
    assert record["history"][0]["step"] == 7
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_corrupt_or_mismatched_checkpoint_is_rejected_and_nothing_overwritten(tmp_path):
    run(4, out_dir=str(tmp_path))
    state_file = tmp_path / "train_state.safetensors"
    wrong = nn.Sequential(nn.Linear(4, 8))
    before = [p.clone() for p in wrong.parameters()]
    with pytest.raises(ModelError, match="does not match"):
        load_train_state(tmp_path, wrong, None)
    assert all(torch.equal(a, b) for a, b in zip(before, wrong.parameters()))
    state_file.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="corrupt"):
        fit(Tiny(), mse, make_batch, TrainConfig(steps=8, out_dir=str(tmp_path)), progress=False)
    assert state_file.read_bytes() == b"not a safetensors file"


@pytest.mark.slow
def test_ddp_two_cpu_processes_hold_identical_weights_for_every_trainer(tmp_path):
    """The toy CLIP, the EfficientVLM teacher (whose loss calls submodules) and BLIP-2's LM and stage 1 under torchrun."""
    worker = Path(__file__).with_name("_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LABKIT_DEVICE": "cpu"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29531", str(worker), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(tmp_path / "rank0_of_2.safetensors"), load_file(tmp_path / "rank1_of_2.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert {key.split(".")[0] for key in a} == {"clip", "teacher", "text_lm", "stage1"}  # every trainer family
    torch.manual_seed(0)
    from labkit.clip.pretrain import new_toy_clip
    init = new_toy_clip(device="cpu").model.state_dict()
    assert not torch.equal(init["visual.proj"], a["clip.visual.proj"])  # training moved the weights


def test_fit_waits_for_the_device_before_every_timer_read(monkeypatch):
    """On CUDA a timer read right after optimizer.step() would miss the queued backward and update."""
    import types

    import labkit.core.train as train_module

    events, real = [], train_module.time.perf_counter
    monkeypatch.setattr(train_module, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: events.append("t") or real()))
    torch.manual_seed(0)
    fit(Tiny(), mse, make_batch, TrainConfig(steps=3, lr=1e-2, fast_steps=3), progress=False)
    step_reads = [i for i, e in enumerate(events) if e == "t"][1:-1]  # leave out the run's start and end
    assert len(step_reads) == 6 and all(events[i - 1] == "sync" for i in step_reads)
