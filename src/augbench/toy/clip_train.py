"""A tiny CLIP for the toy world: an offline BPE tokenizer and a contrastively trained CLIPModel.

The result is an ordinary transformers folder (`CLIPModel`, `CLIPTokenizer`, `CLIPImageProcessor`)
that every later stage loads with `from_pretrained`, exactly as it would load
`openai/clip-vit-large-patch14` in the real world.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from augbench.device import pick_device
from augbench.imaging import shift_flip
from augbench.io import atomic_dir, write_meta
from augbench.shards import iter_shard
from augbench.specs import ClipSpec, spec_dict

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def train_tokenizer(captions: list[str], vocab_size: int):  # -> CLIPTokenizer
    """Train a CLIP-style byte-level BPE tokenizer on captions, offline.

    Vocabulary layout follows CLIP's: 256 byte chars, the same with `</w>`, the merges, then the
    two special tokens last, as in the original vocabulary. The tokenizers library only learns the
    merges; the result is handed to transformers' `CLIPTokenizer` so that it saves and reloads
    like any CLIP tokenizer.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        ByteLevel(add_prefix_space=False),
    ])
    n_merges = max(vocab_size - 2 * len(alphabet) - 2, 0)
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + n_merges, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, special_tokens=[])
    tok.train_from_iterator(captions, trainer)
    model_state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]][:n_merges]
    chars = sorted(set(alphabet), key=lambda c: ord(c))
    vocab_list = chars + [c + "</w>" for c in chars]
    for a, b in merges:
        merged = a + b
        if merged not in vocab_list:
            vocab_list.append(merged)
    seen: dict[str, int] = {}
    for t in vocab_list:
        seen.setdefault(t, len(seen))
    seen[BOS] = len(seen)
    seen[EOS] = len(seen)
    return CLIPTokenizer(vocab=seen, merges=[tuple(m) for m in merges], bos_token=BOS, eos_token=EOS,
                         pad_token=EOS, unk_token=EOS)


def load_pool_arrays(shards: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Decode all pool images (uint8 NHWC) and captions from the shards into memory."""
    images, captions = [], []
    for shard in shards:
        for s in iter_shard(shard):
            images.append(np.asarray(s.pil()))
            captions.append(s.caption)
    if not images:
        raise ValueError(f"pretrain_clip: no images in shards {[str(s) for s in shards]}")
    return np.stack(images), captions


def build_model(spec: ClipSpec, tokenizer) -> torch.nn.Module:  # -> ToyClipModel
    """A ToyClipModel of the configured size; token ids come from the tokenizer, not the defaults."""
    from augbench.toy.clip import ToyClipConfig, ToyClipModel

    text = {
        "vocab_size": len(tokenizer), "hidden_size": spec.text_width, "intermediate_size": spec.text_width * 4,
        "num_hidden_layers": spec.text_layers, "num_attention_heads": spec.heads,
        "max_position_embeddings": spec.max_text_len, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    config = ToyClipConfig(text_config=text, vision_widths=list(spec.vision_widths), image_size=spec.image_size,
                           projection_dim=spec.embed_dim)
    return ToyClipModel(config)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """CLIP's mean/std normalisation of a float NCHW batch in [0, 1]."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def train_clip(images: np.ndarray, captions: list[str], spec: ClipSpec):  # -> (CLIPModel, CLIPTokenizer, float)
    """Contrastive training on uint8 NHWC images and their captions; returns (model, tokenizer, loss)."""
    started = time.time()
    torch.manual_seed(spec.seed)
    device = pick_device()
    log.info("pretrain_clip: %d images, device %s, spec %s", len(images), device, spec)
    tokenizer = train_tokenizer(captions, spec.vocab_size)
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=spec.max_text_len, return_tensors="pt")
    model = build_model(spec, tokenizer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return spec.lr * (step + 1) / spec.warmup_steps
        t = (step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * t))

    g = torch.Generator().manual_seed(spec.seed)
    imgs_t = torch.from_numpy(images)
    n = len(imgs_t)
    perm = torch.randperm(n, generator=g)
    cursor = 0
    loss_ema = None
    model.train()
    for step in range(spec.steps):
        if cursor + spec.batch_size > n:
            perm, cursor = torch.randperm(n, generator=g), 0
        idx = perm[cursor:cursor + spec.batch_size]
        cursor += spec.batch_size
        pixel = normalise(shift_flip(imgs_t[idx], g)).to(device)
        out_ = model(input_ids=ids["input_ids"][idx].to(device), attention_mask=ids["attention_mask"][idx].to(device),
                     pixel_values=pixel, return_loss=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        out_["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = out_["loss"].item() if loss_ema is None else 0.98 * loss_ema + 0.02 * out_["loss"].item()
        if step % 100 == 0 or step == spec.steps - 1:
            log.info("pretrain_clip: step %d/%d loss %.4f lr %.2e (%.0fs)", step, spec.steps, loss_ema, lr_at(step), time.time() - started)
    model.eval()
    return model.to("cpu"), tokenizer, float(loss_ema or 0.0)


def save_clip(model: torch.nn.Module, tokenizer, image_size: int, out: Path) -> None:
    """Save a CLIP-style model with its tokenizer and image processor as one `from_pretrained` folder, atomically."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                   image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def pretrain_clip(shards: list[Path], out: Path, spec: ClipSpec) -> dict[str, float]:
    """Train the tiny CLIP on the pool's images and captions and save it as a transformers folder."""
    started = time.time()
    images, captions = load_pool_arrays(shards)
    model, tokenizer, loss = train_clip(images, captions, spec)
    save_clip(model, tokenizer, spec.image_size, out)
    stats = {"final_loss": loss, "n_images": len(images), "steps": spec.steps}
    write_meta(out, "pretrain_clip", spec_dict(spec), started, stats=stats)
    return stats
