"""Stand-in weights in a Hugging Face cache laid out as the hub client writes it, for testing the real-model
paths offline: ``models--<org>--<name>/refs/main`` holds a revision, ``snapshots/<revision>/<file>`` are
symbolic links to content-addressed ``blobs/<sha256>``. The models are random-init, tiny versions of the real
architectures; the code paths that load them are the real ones."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"
WORDS = ["<unk>", "<pad>", "</s>", "<image>", "question", ":", "answer", "a", "photo", "of", "cat", "dog", "what",
         "is", "in", "the", "picture", "?", "red", "blue"]


def add_to_cache(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike) -> Path:
    """Move every file of ``folder`` into ``cache_dir`` as the hub client stores ``repo_id``; returns the snapshot."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot, blobs = repo / "snapshots" / REVISION, repo / "blobs"
    snapshot.mkdir(parents=True, exist_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file():
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.move(str(file), blobs / digest)
            link = snapshot / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def blip2_config():
    from transformers import Blip2Config, OPTConfig

    text = OPTConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return Blip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          image_size=32, patch_size=8),
                       qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                           encoder_hidden_size=32, vocab_size=len(WORDS)),
                       text_config=text.to_dict(), num_query_tokens=4, image_token_index=WORDS.index("<image>"))


def write_blip2(cache_dir: str | os.PathLike, repo_id: str = "Salesforce/blip2-opt-2.7b", seed: int = 0) -> Path:
    """A tiny random-init BLIP-2 (OPT) with its processor (BLIP image processor + a word-level tokenizer)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(blip2_config())
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(":", behavior="isolated"),
                                                     pre_tokenizers.Split("?", behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                        bos_token="</s>")
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        return add_to_cache(cache_dir, repo_id, tmp)


def write_openclip(cache_dir: str | os.PathLike, arch: str = "ViT-B-32", tag: str = "laion2b_s34b_b79k",
                   seed: int = 0) -> Path:
    """open_clip's ``arch`` with random-init weights under the repository and file name its ``tag`` names."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    from labkit.clip.model import openclip_hub_files

    repo, candidates = openclip_hub_files(arch, tag)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, candidates[0]))
        Path(tmp, "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch)}))
        return add_to_cache(cache_dir, repo, tmp)
