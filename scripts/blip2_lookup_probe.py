"""Can "what shape is the red object?" be answered by looking an object up by its colour? Two probes.

Both train a 6-way shape classifier on fresh ToyWorld training scenes with 2-3 objects and report
its accuracy on the questions of 1,000 (``--eval-n``) test scenes; no language model is involved:

``--probe features``  one cross-attention layer over the frozen toy-CLIP patch tokens whose query
                      is a learned embedding of the colour word (4 heads, optional LayerNorm on the
                      features): do the frozen features allow a colour-keyed look-up at all?
``--probe qformer``   the BLIP-2 Q-Former (the shipped stage 1's, or ``--fresh``) reading the question
                      as a text-conditioned stage 2 does (ITM layout), mean query output -> Linear,
                      trained end to end on shape questions: can the Q-Former learn the look-up when
                      the signal is direct rather than through the frozen LM? ``--ln`` puts a trainable
                      LayerNorm on the frozen features first (LAVIS's ``ln_vision``).

Measured on 2 CPU cores (README, BLIP-2 section; test accuracy every 300 steps)::

    python scripts/blip2_lookup_probe.py --probe features --steps 1500         # 0.84 0.91 0.93 0.92 0.94 (85 s)
    python scripts/blip2_lookup_probe.py --probe qformer --steps 2400          # ... 0.90 0.93 0.94 0.94 0.73 (spike)
    python scripts/blip2_lookup_probe.py --probe qformer --steps 2400 --ln     # ... 0.89 0.93 0.95 0.96 0.95
    python scripts/blip2_lookup_probe.py --probe qformer --steps 900 --fresh   # 0.51 0.52 0.52
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit.blip2.data import ASSETS, load_encoder, question_prefixes, question_type, render
from labkit.blip2.qformer import QFormer
from labkit.blip2.train import load_stage1, stage1_config
from labkit.data import toyworld as tw

SHAPES, COLORS = list(tw.BASE_SHAPES), list(tw.COLORS)


def shape_questions(world: tw.ToyWorld, start: int, n: int, rng: np.random.Generator):
    """Scenes with at least one uniquely coloured object, one "what shape is the <colour> object?" each."""
    scenes, colors, answers = [], [], []
    for i in range(start, start + n):
        scene = world.scene(i)
        qa = [(q, a) for q, a in scene.questions() if question_type(q) == "shape"]
        if qa:
            q, a = qa[rng.integers(len(qa))]
            scenes.append(scene)
            colors.append(q.split()[-2])
            answers.append(SHAPES.index(a))
    return scenes, colors, torch.tensor(answers)


class ColourKeyedAttention(nn.Module):
    """LayerNorm, one multi-head cross-attention whose query is the colour word's embedding, a linear read-out."""

    def __init__(self, width: int, heads: int = 4, dim: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query = nn.Embedding(len(COLORS), dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=width, vdim=width, batch_first=True)
        self.out = nn.Linear(dim, len(SHAPES))

    def forward(self, feats: torch.Tensor, colors: list[str]) -> torch.Tensor:
        feats = self.norm(feats)
        query = self.query(torch.tensor([COLORS.index(c) for c in colors]))[:, None]
        return self.out(self.attn(query, feats, feats, need_weights=False)[0][:, 0])


class QuestionReadingQFormer(nn.Module):
    """The Q-Former reading the question with its queries (ITM layout), mean query output -> Linear."""

    def __init__(self, fresh: bool, ln_vision: bool):
        super().__init__()
        self.qformer = QFormer(stage1_config()) if fresh else load_stage1(ASSETS / "stage1").qformer
        self.ln_vision = nn.LayerNorm(self.qformer.config.encoder_width) if ln_vision else nn.Identity()
        self.out = nn.Linear(self.qformer.config.hidden, len(SHAPES))

    def forward(self, feats: torch.Tensor, colors: list[str]) -> torch.Tensor:
        ids, mask = question_prefixes([f"what shape is the {c} object?" for c in colors])
        out = self.qformer(self.ln_vision(feats), ids, mask, mode="itm")
        return self.out(out.query.mean(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", choices=("features", "qformer"), required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ln", action="store_true", help="a trainable LayerNorm on the frozen features (qformer probe)")
    ap.add_argument("--fresh", action="store_true", help="a randomly initialised Q-Former instead of stage 1's")
    ap.add_argument("--eval-n", type=int, default=1000)
    args = ap.parse_args()
    torch.manual_seed(0)
    encoder = load_encoder("toy")
    model = (ColourKeyedAttention(encoder.width) if args.probe == "features"
             else QuestionReadingQFormer(args.fresh, args.ln)).train()
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.05)
    train = tw.ToyWorld("train", seed=0, size=10 ** 7, objects=(2, 3))
    test = tw.ToyWorld("test", seed=0, size=10 ** 7, objects=(2, 3))
    t_scenes, t_colors, t_answers = shape_questions(test, 0, args.eval_n, np.random.default_rng(1))
    t_feats = encoder(render(t_scenes))
    rng, started = np.random.default_rng(0), time.perf_counter()
    for step in range(1, args.steps + 1):
        scenes, colors, answers = shape_questions(train, step * args.batch_size, args.batch_size, rng)
        loss = F.cross_entropy(model(encoder(render(scenes)), colors), answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 300 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                acc = (model(t_feats, t_colors).argmax(-1) == t_answers).float().mean().item()
            model.train()
            print(f"step {step}: loss {loss.item():.3f}, test shape accuracy {acc:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
