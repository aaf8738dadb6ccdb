"""BLIP-2 next to ``transformers``: the numerical equivalence of labkit's Q-Former and stage 1 with
``Blip2QFormerModel`` (weights mapped name by name, outputs equal to float precision), and the path to a
real, cached BLIP-2 (``Salesforce/blip2-*``) for attention maps on real photos.

:func:`load_hf_qformer` and :func:`load_hf_stage1` copy a ``transformers`` state dict into labkit's
modules; :func:`hf_equivalence_max_abs_diff` builds random ``transformers`` Q-Formers of several shapes
and reports the largest difference (``labkit eval qformer`` prints it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labkit.blip2.qformer import QFormer, QFormerConfig
from labkit.blip2.stage1 import Blip2Stage1
from labkit.core.checkpoint import ModelError
from labkit.core.device import get_device

# transformers name (after "encoder.layer.{i}.") -> labkit name (after "layers.{i}.")
_HF_LAYER_NAMES = {
    "attention.attention.query": "self_attn.attn.query",
    "attention.attention.key": "self_attn.attn.key",
    "attention.attention.value": "self_attn.attn.value",
    "attention.output.dense": "self_attn.attn.out",
    "attention.output.LayerNorm": "self_attn.norm",
    "intermediate.dense": "ffn_text.dense_in",
    "output.dense": "ffn_text.dense_out",
    "output.LayerNorm": "ffn_text.norm",
    "intermediate_query.dense": "ffn_query.dense_in",
    "output_query.dense": "ffn_query.dense_out",
    "output_query.LayerNorm": "ffn_query.norm",
}

_HF_LAYER_NAMES |= {k.replace("attention.", "crossattention.", 1): v.replace("self_", "cross_")
                    for k, v in _HF_LAYER_NAMES.items() if k.startswith("attention.")}


_HF_TOP_NAMES = {"layernorm": "embed_norm", "embeddings.word_embeddings": "word_embeddings",
                 "embeddings.position_embeddings": "position_embeddings"}


_HF_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


def _hf_to_labkit_name(name: str) -> str | None:
    match = _HF_LAYER_RE.fullmatch(name)
    if match and match[2] in _HF_LAYER_NAMES:
        return f"layers.{match[1]}.{_HF_LAYER_NAMES[match[2]]}.{match[3]}"
    stem, _, leaf = name.rpartition(".")
    return f"{_HF_TOP_NAMES[stem]}.{leaf}" if stem in _HF_TOP_NAMES and leaf in ("weight", "bias") else None


@torch.no_grad()
def load_hf_qformer(qformer: QFormer, hf_model_state_dict: dict, query_tokens: torch.Tensor | None = None) -> list[str]:
    """Copy a ``transformers`` ``Blip2QFormerModel`` state dict (+ ``query_tokens``) into ``qformer``.

    Accepts the Q-Former's own state dict, optionally merged with ``Blip2TextEmbeddings``
    weights under ``embeddings.``, or a whole BLIP-2 model's state dict (keys under
    ``qformer.``; ``query_tokens`` and ``embeddings.`` are then picked up too; other towers are
    ignored). Returns the labkit parameter names left untouched: the text FFNs and text
    embeddings when the checkpoint has no text input (``use_qformer_text_input=False``, as in
    ``Blip2ForConditionalGeneration``). Shape or layout mismatches raise ``ValueError``.
    """
    own = qformer.state_dict()
    if any(k.startswith("qformer.") for k in hf_model_state_dict):
        hf_model_state_dict = {k.removeprefix("qformer."): v for k, v in hf_model_state_dict.items()
                               if k.startswith(("qformer.", "embeddings.", "query_tokens"))}
    if query_tokens is None:
        query_tokens = hf_model_state_dict.get("query_tokens")
    if query_tokens is None:
        raise ValueError("query_tokens missing: pass the BLIP-2 model's query_tokens [1, Q, hidden]")
    updates = {"query_tokens": torch.as_tensor(query_tokens)}
    for name, value in hf_model_state_dict.items():
        if name == "query_tokens" or name.endswith("position_ids"):  # position_ids: a non-learned buffer
            continue
        target = _hf_to_labkit_name(name)
        if target is None or target not in own:
            raise ValueError(f"checkpoint key {name!r} has no place in this Q-Former (layers={qformer.config.layers}, "
                             f"cross_attention_frequency={qformer.config.cross_attention_frequency})")
        updates[target] = value
    for name, value in updates.items():
        if value.shape != own[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != Q-Former shape {tuple(own[name].shape)}; "
                             f"check QFormerConfig ({qformer.config})")
        own[name].copy_(value)
    missing = [k for k in own if k not in updates]
    query_path = [k for k in missing if not k.startswith(("word_", "position_")) and ".ffn_text." not in k]
    if query_path:
        raise ValueError(f"checkpoint lacks Q-Former weights: {query_path[:5]}{' …' if len(query_path) > 5 else ''}")
    return missing


@torch.no_grad()
def load_hf_stage1(model: Blip2Stage1, hf_state_dict: dict) -> list[str]:
    """Load a ``transformers`` ``Blip2ForImageTextRetrieval`` state dict (e.g. ``Salesforce/blip2-itm-vit-g``).

    The Q-Former goes through :func:`labkit.blip2.hf.load_hf_qformer`; ``vision_projection``,
    ``text_projection`` and ``itm_head`` map to ``vision_proj``, ``text_proj`` and ``itm_head``.
    The LM head and temperature stay as they are (that checkpoint has none). Returns the labkit
    Q-Former parameter names left untouched.
    """
    missing = load_hf_qformer(model.qformer, hf_state_dict)
    for hf_name, head in (("vision_projection", model.vision_proj), ("text_projection", model.text_proj),
                          ("itm_head", model.itm_head)):
        for leaf in ("weight", "bias"):
            value, own = hf_state_dict.get(f"{hf_name}.{leaf}"), getattr(head, leaf)
            if value is None or value.shape != own.shape:
                shape = None if value is None else tuple(value.shape)
                raise ValueError(f"{hf_name}.{leaf}: checkpoint shape {shape} != expected {tuple(own.shape)}")
            own.copy_(value)
    return missing


def hf_equivalence_max_abs_diff(seed: int = 0) -> float:
    """Max abs difference between labkit's Q-Former and ``transformers``' ``Blip2QFormerModel`` with the same random weights.

    Two random configurations (cross-attention in every layer / every other layer), weights
    moved off their init, queries alone and queries + text (bi-directional), fp32.
    """
    worst = 0.0
    with torch.random.fork_rng():  # deterministic weights without disturbing the caller's random state
        torch.manual_seed(seed)
        for config in ((32, 2, 4, 1, 24, 4), (48, 3, 3, 2, 40, 5)):
            worst = max(worst, _hf_equivalence_case(*config, seed=seed))
    return worst


def _hf_equivalence_case(hidden, layers, heads, freq, width, n_query, seed) -> float:
    """One configuration: max abs difference of the query outputs and of the queries + text outputs."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings



    cfg = Blip2QFormerConfig(vocab_size=40, max_position_embeddings=16, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=2 * hidden, encoder_hidden_size=width,
                             cross_attention_frequency=freq, use_qformer_text_input=True)
    g = torch.Generator().manual_seed(seed)
    hf = Blip2QFormerModel._from_config(cfg, attn_implementation="eager").eval()
    emb = Blip2TextEmbeddings(cfg).eval()
    with torch.no_grad():
        for p in [*hf.parameters(), *emb.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    queries = torch.randn(1, n_query, hidden, generator=g)
    ours = QFormer(QFormerConfig.from_hf(cfg, num_queries=n_query)).eval()
    load_hf_qformer(ours, {**hf.state_dict(), **{f"embeddings.{k}": v for k, v in emb.state_dict().items()}}, queries)
    feats, ids = torch.randn(3, 7, width, generator=g), torch.randint(1, 40, (3, 6), generator=g)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 2])[:, None]
    q = queries.expand(3, -1, -1)
    with torch.no_grad():
        ref_q = hf(query_embeds=q, encoder_hidden_states=feats).last_hidden_state
        ref_qt = hf(query_embeds=emb(ids, query_embeds=q), query_length=n_query, encoder_hidden_states=feats,
                    attention_mask=torch.cat([torch.ones(3, n_query), mask.float()], 1)).last_hidden_state
        out_q, out_qt = ours(feats), ours(feats, ids, mask, mode="itm")
    return max((out_q.query - ref_q).abs().max().item(),
               (torch.cat([out_qt.query, out_qt.text], 1) - ref_qt).abs().max().item())


BLIP2_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
               "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json", "tokenizer*",
               "special_tokens_map.json", "added_tokens.json", "spiece.model", "vocab.json", "merges.txt")
"""The files of a ``Salesforce/blip2-*`` repository that the lab reads (safetensors only: no pickled weights)."""


def cached_blip2(model_id: str = "Salesforce/blip2-opt-2.7b") -> bool:
    """Whether ``model_id``'s config is in the Hugging Face cache (never touches the network)."""
    return _cached(model_id, "config.json") is not None


def _cached(model_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(model_id, filename)
    return hit if isinstance(hit, str) else None


def _not_cached(model_id: str, what: str) -> ModelError:
    return ModelError(f"{model_id}: {what} is not in the Hugging Face cache, and the lab never downloads at run time. "
                      f"On a machine with internet run `labkit fetch {model_id}` (or `huggingface-cli download {model_id}`) "
                      "and copy the cache (~/.cache/huggingface) here, or point HF_HOME at it.")


def _weight_files(model_id: str, prefixes: tuple[str, ...] | None) -> dict[str, list[str]]:
    """``{cached safetensors file: [tensor names to read]}`` for the tensors under ``prefixes`` (None: all)."""
    index = _cached(model_id, "model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if prefixes is None or name.startswith(prefixes):
                files.setdefault(shard, []).append(name)
        out = {}
        for shard, names in files.items():
            path = _cached(model_id, shard)
            if path is None:
                raise _not_cached(model_id, f"the weights shard {shard}")
            out[path] = names
        return out
    single = _cached(model_id, "model.safetensors")
    if single is None:
        raise _not_cached(model_id, "model.safetensors (safetensors weights; the lab never unpickles .bin files)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {single: [k for k in f.keys() if prefixes is None or k.startswith(prefixes)]}


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_tensors(model_id: str, prefixes: tuple[str, ...] | None, dtype: torch.dtype, what: str) -> dict:
    """The tensors under ``prefixes`` in ``dtype``, after checking that they fit in memory (a clear error, not swap)."""
    from safetensors import safe_open

    files = _weight_files(model_id, prefixes)
    n_values = 0
    for path, names in files.items():
        with safe_open(path, "pt") as f:
            n_values += sum(math.prod(f.get_slice(n).get_shape()) for n in names)
    need, free = n_values * torch.finfo(dtype).bits // 8, _available_memory()
    if free is not None and need * 1.2 > free:
        raise ModelError(f"{model_id}: {what} needs about {need / 2**30:.1f} GiB in {dtype} and this machine has "
                         f"{free / 2**30:.1f} GiB available; close other programs, use a machine with more memory "
                         "or a smaller BLIP-2 (e.g. Salesforce/blip2-opt-2.7b)")
    state = {}
    for path, names in files.items():
        with safe_open(path, "pt") as f:
            for n in names:
                t = f.get_tensor(n)
                state[n] = t.to(dtype) if t.is_floating_point() else t
    return state


def real_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and CPU, fp16 on MPS: half the memory of fp32 for a real BLIP-2."""
    return torch.float16 if device.type == "mps" else torch.bfloat16


def _config(model_id: str):
    from transformers import Blip2Config

    if not cached_blip2(model_id):
        raise _not_cached(model_id, "its config")
    try:
        return Blip2Config.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{model_id} is not a BLIP-2 checkpoint transformers can read: {e}") from e


def _assign(module: nn.Module, state: dict, prefix: str, model_id: str) -> nn.Module:
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(own, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{model_id}: the cached weights under {prefix!r} do not match its config: {e}") from e
    return module.eval()


@torch.no_grad()
def real_query_attention(model_id: str, image: np.ndarray, device: torch.device | str | None = None
                         ) -> tuple[torch.Tensor, int]:
    """Cross-attention of a cached real BLIP-2's queries over ``image`` (HWC uint8): ``([Q, grid, grid], grid)``.

    Averaged over heads and over the Q-Former's cross-attention layers. Loads only the vision tower, the
    Q-Former and the query tokens (for ``blip2-opt-2.7b`` about 1.1B parameters, 2.2 GiB in bf16; the LM is
    never read), with eager attention, which is the implementation that returns attention maps. Raises
    :class:`ModelError` when the weights are not cached or do not fit in memory.
    """
    from transformers import Blip2QFormerModel, Blip2VisionModel, BlipImageProcessor

    device = torch.device(device) if device is not None else get_device()
    config, dtype = _config(model_id), real_dtype(device)
    config.qformer_config._attn_implementation = "eager"  # sdpa returns no attention maps
    state = _load_tensors(model_id, ("vision_model.", "qformer.", "query_tokens"), dtype,
                          "the vision tower and Q-Former")
    with torch.device("meta"):
        vision, qformer = Blip2VisionModel(config.vision_config), Blip2QFormerModel(config.qformer_config)
    vision = _assign(vision, state, "vision_model.", model_id).to(device)
    qformer = _assign(qformer, state, "qformer.", model_id).to(device)
    try:
        processor = BlipImageProcessor.from_pretrained(model_id, local_files_only=True)
    except OSError as e:
        raise _not_cached(model_id, "preprocessor_config.json") from e
    pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(device, dtype)
    feats = vision(pixels).last_hidden_state
    out = qformer(query_embeds=state["query_tokens"].to(device), encoder_hidden_states=feats, output_attentions=True)
    cross = [a for a in out.cross_attentions if a is not None]
    if not cross:
        raise ModelError(f"{model_id}: the Q-Former returned no cross-attention maps")
    maps = torch.stack(cross).float().mean(dim=(0, 2))[0, :, 1:]  # drop the vision CLS token
    grid = int(round(maps.shape[-1] ** 0.5))
    return maps.view(-1, grid, grid).cpu(), grid


@torch.no_grad()
def real_caption_and_answer(model_id: str, image: np.ndarray, question: str | None = None,
                            device: torch.device | str | None = None, max_new_tokens: int = 20) -> dict:
    """A cached real BLIP-2 captions ``image`` and, given ``question``, answers it (``generate``; OPT and Flan-T5).

    Loads the whole model in bf16 (fp16 on MPS): ``blip2-opt-2.7b`` has 3.9B parameters, about 7.3 GiB;
    ``blip2-flan-t5-xl`` 3.9B as well. Raises :class:`ModelError` when it is not cached or does not fit.
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    device = torch.device(device) if device is not None else get_device()
    config, dtype = _config(model_id), real_dtype(device)
    if question is not None and not question.strip():
        raise ValueError("the question is empty; type a question or pass question=None for a caption only")
    state = _load_tensors(model_id, None, dtype, "the whole model (vision tower, Q-Former and language model)")
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    own = model.state_dict().keys()
    tied = [k for k in own if k not in state]
    for k in tied:  # tied output embeddings are stored once
        source = "language_model.model.decoder.embed_tokens.weight" if "lm_head" in k else "language_model.shared.weight"
        if source in state:
            state[k] = state[source]
    model = _assign(model, state, "", model_id).to(device)
    try:
        processor = Blip2Processor.from_pretrained(model_id, local_files_only=True)
    except OSError as e:
        raise _not_cached(model_id, "its processor (preprocessor_config.json and tokenizer files)") from e

    def generate(prompt: str | None) -> str:
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        if config.use_decoder_only_language_model and "input_ids" in inputs:  # OPT continues its prompt; T5 starts afresh
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    out = {"model": model_id, "caption": generate(None)}
    if question is not None:
        out["question"], out["answer"] = question, generate(f"Question: {question.strip()} Answer:")
    return out
