"""Writes notebooks/04_efficientvlm.ipynb (no outputs). Run once; the notebook is then edited as a notebook."""
import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s.strip()))  # noqa: E731

md(r"""
# 04 · EfficientVLM: distil, then prune with learned L0 gates

Wang et al., *EfficientVLM: Fast and Accurate Vision-Language Models via Knowledge Distillation and
Modal-adaptive Pruning*, Findings of ACL 2023.

EfficientVLM compresses an X-VLM (12-layer ViT, 6 text + 6 fusion layers) in two steps:

1. **Distil** into a student with *half the layers* of each encoder, initialised from teacher layers and
   trained to copy the teacher's hidden states, attention scores and output logits (§3.1).
2. **Prune** the student with **hard-concrete L0 gates** on every attention head and FFN unit of every
   modality, driven to one global sparsity target by a Lagrangian; *how much* to cut from vision, text and
   fusion is learned, not set (§3.2). Finally the gates become a mask and the model is physically smaller.

Headline: 44% of the teacher's parameters, 98.4% of its accuracy, 2.2× faster inference.

Here the teacher is a ToyWorld VLM in the X-VLM mould (`labkit.vlm`): vision and text towers initialised from
the lab's toy CLIP, a 4-layer fusion encoder with cross-attention, ITC, ITM and MLM heads. The method is in
`labkit.efficient` and `labkit.vlm_train`; the plots in `labkit.viz_efficient`. `LABKIT_FAST=1` shortens every loop.
""")
code(r"""
%matplotlib inline
import copy

import torch

from labkit.efficientvlm import prune as eff
from labkit.efficientvlm import viz
from labkit.core.train import fast_mode
from labkit.core.device import get_device
from labkit.efficientvlm.eval import count_params, efficient_assets_dir, eval_scenes, evaluate_vlm, inference_speedup
from labkit.clip.model import load_clip
from labkit.efficientvlm.model import MODALITIES, load_vlm
from labkit.efficientvlm.prune import prune_student, recover_pruned
from labkit.efficientvlm.distill import train_student
from labkit.efficientvlm.train import train_teacher

FAST = fast_mode()
torch.manual_seed(0)
clip = load_clip("toy")  # preprocessing, tokenizer, and the towers the teacher starts from
device = clip.device
held_out = eval_scenes(clip, n=60 if FAST else 500)  # test-split scenes with 2-3 objects + a hard negative caption each
print("device:", device, "| fast mode:", FAST)
""")
md(r"""
## 1 · The teacher

Load the shipped teacher (`labkit train teacher` made it), or train it if it is missing. Two numbers describe it:
**ITM accuracy** (does this caption match this image? half the pairs are *hard negatives*: the same scene with
different shapes) and **zero-shot retrieval R@1** from the ITC embeddings.
""")
code(r"""
def load_or_train(name, train):
    path = efficient_assets_dir() / name
    if (path / "vlm_config.json").is_file():
        return load_vlm(path, device)
    print(f"no shipped {name}: training a short one")
    return train()[0]


teacher = load_or_train("teacher", lambda: train_teacher(clip, steps=3 if FAST else 900))
for m in MODALITIES:
    n = sum(p.numel() for p in teacher.encoders[m].parameters())
    print(f"{m:>7}: {teacher.cfg.layers(m)} layers, {n / 1e6:.2f}M parameters")
print("teacher:", count_params(teacher) / 1e6, "M parameters;", evaluate_vlm(teacher, held_out))
""")
md(r"""
## 2 · The layer map

The student keeps half of each encoder. With hidden states counted *including* the embedding output, teacher
and student have T+1 and S+1 states and k = T / S: student state i learns from teacher state i·k, and the
attention scores of student layer i from teacher layer i·k + k − 1 (the last layer of its block). The student's
layer i is *initialised* from teacher layer i·k, the first of its block (measured: a faster start than copying
the last one).
""")
code(r"""
student_depths = {m: (teacher.cfg.layers(m), teacher.cfg.layers(m) // 2) for m in MODALITIES}
viz.show_layer_map(student_depths);
""")
md(r"""
## 3 · Distillation

The student's loss is `0.6 · (ITC + ITM + MLM) + 0.4 · KD` with KD = hidden-state MSE + attention-score MSE
(masked positions zeroed, scaled by the key length) per modality, plus the KL divergence of the ITM and MLM
logits (`labkit.vlm_train.distillation_loss`, weights from the official `GeneralDistill.py`). Below: the curves
recorded when the shipped student was trained.
""")
code(r"""
student = load_or_train("student", lambda: train_student(teacher, clip, steps=3 if FAST else 4000))
curve = getattr(student, "meta", {}).get("curve", [])
if curve:
    viz.show_curves(curve, ["itc", "itm", "mlm", "kd_itc", "kd_itm", "kd_mlm", "kd_vision_hidden", "kd_vision_attn",
                            "kd_text_hidden", "kd_text_attn", "kd_fusion_hidden", "kd_fusion_attn"],
                    title="student distillation: task and KD losses")
print("student:", count_params(student) / 1e6, "M parameters;", evaluate_vlm(student, held_out))
""")
md(r"""
## 4 · Hard-concrete gates

Each head and FFN unit gets a gate `z = clamp(sigmoid((log u − log(1−u) + log α)/β)·(ζ−γ) + γ, 0, 1)` with
u ~ U(0, 1), β = 2/3, γ = −0.1, ζ = 1.1 (Louizos et al. 2018). Stretching past [0, 1] and clamping puts real
probability mass on *exactly* 0 and 1, and `P(z ≠ 0) = sigmoid(log α − β·log(−γ/ζ))` is differentiable in log α:
the expected L0 norm. Weighted by the parameters each gate controls, it gives the **expected sparsity**.
""")
code(r"""
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for log_alpha in (-2.0, 0.0, 2.0):
    z = eff.hard_concrete_sample(torch.full((20000,), log_alpha))
    axes[0].hist(z.numpy(), bins=40, alpha=0.5, label=f"log α = {log_alpha:g}")
axes[0].set_title("gate samples: mass at exactly 0 and 1")
axes[0].legend()
grid = torch.linspace(-6, 6, 100)
axes[1].plot(grid, eff.expected_l0(grid), label="P(z ≠ 0), expected L0")
axes[1].plot(grid, eff.deterministic_gate(grid), label="test-time gate")
axes[1].set_xlabel("log α")
axes[1].legend()
fig.tight_layout()
""")
md(r"""
## 5 · Modal-adaptive pruning

One global target sparsity t, warmed up from 0, and the Lagrangian `λ1(ŝ − t) + λ2(ŝ − t)²` added to the
distillation loss. The multipliers λ are trained by gradient **ascent**: while the model is not sparse enough,
the penalty grows until cutting parameters is cheaper than keeping them. Nothing says which modality to cut:
watch the split emerge.
""")
code(r"""
target = 0.5
pruned, record = prune_student(student, teacher, clip, target, steps=4 if FAST else 200)
viz.show_modality_split(record["history"]);
""")
code(r"""
viz.show_gate_evolution(record["gate_snapshots"]);
viz.show_gates(record["gate_snapshots"][-1][1], title=f"gates at the end of pruning (target {target})");
""")
md(r"""
## 6 · Finalize: a physically smaller model

`finalize` turns each gate into its deterministic test-time value, removes heads and units whose gate is 0
(smaller weight matrices, not zeros) and folds the remaining gate values into the output projections, so the
smaller model computes exactly what the masked one did (`tests/test_efficient.py` checks it).
""")
code(r"""
print("realised sparsity by modality:", {m: round(v, 3) for m, v in record["sparsity_by_modality"].items()})
for name in ("vision.0", "text.0", "fusion.0"):
    print(name, {k: v for k, v in record["sizes"].items() if k.startswith(name)})
print(f"parameters: teacher {count_params(teacher):,}  student {count_params(student):,}  pruned {count_params(pruned):,}")
print("pruned here:", evaluate_vlm(pruned, held_out))
""")
md(r"""
## 6b · Recovery: distil the smaller model once more

Pruning ends with a model whose surviving weights were tuned *with* the gates open. A short round of the same
distillation (task + hidden-state + logits KD; the attention-score MSE no longer fits once heads are gone)
lets them adjust to the new shape. The shipped model got 500 such steps (`labkit train pruned --recover-steps 500`);
here a short round on a copy of the model just pruned. Nothing is removed or added: the size stays the same.
""")
code(r"""
recovered, recovery = recover_pruned(copy.deepcopy(pruned), teacher, clip, steps=3 if FAST else 150)
assert count_params(recovered) == count_params(pruned)
losses = [h["loss"] for h in recovery["history"]]
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.plot(losses)
ax.set_xlabel("recovery step")
ax.set_ylabel("distillation loss")
fig.tight_layout()
print("before recovery:", evaluate_vlm(pruned, held_out))
print("after recovery: ", evaluate_vlm(recovered, held_out))
""")
md(r"""
## 7 · Speed and accuracy

Speed is measured, not counted: the median time to score image–caption pairs through all three encoders,
every model interleaved in this process. `labkit eval efficient --json` runs the full version (1,000 test
scenes and a sweep of targets; README table); here the shipped pruned model and the one just pruned, before and after recovery.
""")
code(r"""
shipped = load_or_train("pruned", lambda: (pruned, None))
images, captions = held_out[0][:128], held_out[1][:128]
speed = inference_speedup(teacher, {"student": student, "shipped pruned": shipped, "pruned here": pruned,
                                    "recovered here": recovered},
                          images, captions, repeats=2 if FAST else 10)
base = evaluate_vlm(teacher, held_out)
rows = []
for name, model in (("student", student), ("shipped pruned", shipped), ("pruned here", pruned),
                    ("recovered here", recovered)):
    m = evaluate_vlm(model, held_out)
    rows.append((name, count_params(model), speed[name]["speedup"], m["itm_accuracy"] / base["itm_accuracy"],
                 m["retrieval_r1"] / base["retrieval_r1"]))
    print(f"{name:>15}: {rows[-1][1]:>9,} params  {rows[-1][2]:.2f}x faster  "
          f"ITM retention {rows[-1][3]:.3f}  retrieval retention {rows[-1][4]:.3f}")
fig, ax = plt.subplots(figsize=(5.5, 3.6))
for name, _, speedup, itm, retrieval in rows:
    ax.scatter(speedup, itm, marker="o", label=f"{name} (ITM)")
    ax.scatter(speedup, retrieval, marker="s", label=f"{name} (retrieval)")
ax.scatter(1, 1, marker="D", color="k", label="teacher")
ax.axhline(0.95, color="0.5", ls=":")
ax.set_xlabel("speedup over the teacher")
ax.set_ylabel("retention")
ax.legend(fontsize=7)
fig.tight_layout()
""")
md(r"""
## What to take away

* Distillation alone halves the depth; pruning then removes what the task does not need, and **the gates decide
  where**: compare the modality split above with a uniform cut.
* Speedups are real only when matrices shrink: `finalize` removes heads and units; a zero gate alone saves nothing.
* A short recovery distillation after `finalize` buys back most of what pruning cost, at no cost in speed.
* Try: a higher target, a different warm-up (`warmup_fraction`), or pruning the teacher directly instead of the
  distilled student.
""")

nb = nbf.v4.new_notebook()
nb.cells = cells
nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
               "language_info": {"name": "python"}}
nbf.write(nb, "notebooks/04_efficientvlm.ipynb")
