"""Random-weight BLIP and CLIP models with generated tokenizers, for tests and benchmarks.

Nothing is downloaded: configs are written out here, tokenizers are built from a generated
vocabulary, and the result is saved with ``save_pretrained`` so the job loads it with
``from_pretrained`` exactly as it loads real checkpoints.

* ``tiny``: a few hundred thousand parameters, small images; makes a test run take seconds.
* ``full``: the architecture of Salesforce/blip-image-captioning-base (384 px) and
  openai/clip-vit-base-patch32 (224 px) with random weights: the real cost per image, for
  benchmarks.

Usage: ``python -m captioning.model_factory --variant tiny|full --out DIR`` writes
``DIR/blip`` and ``DIR/clip`` (skipped when a folder already holds the same variant).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "captioning_model_factory.json"
FACTORY_VERSION = 2
VARIANTS = ("tiny", "full")

# A small real vocabulary first (readable captions), then generated pseudo-words.
_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "at", "by", "near", "under", "over", "two", "three", "man", "woman", "child", "dog", "cat", "bird", "horse", "car", "bus", "train", "boat", "plane", "tree", "flower", "house", "street", "beach", "field", "road", "table", "chair", "bed", "window", "door", "wall", "sky", "cloud", "water", "river", "lake", "sea", "mountain", "snow", "grass", "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "grey", "small", "large", "big", "little", "old", "young", "sitting", "standing", "running", "walking", "lying", "flying", "playing", "eating", "holding", "looking", "picture", "photo", "image", "close", "up", "view", "group", "people", "person", "shape", "square", "circle", "stripe", "pattern", "background", "colorful", "bright", "dark", "light", "top", "front", "side", "next"]


@dataclass(frozen=True)
class Variant:
    """Sizes of one variant; full mirrors the public base checkpoints."""

    blip_text: dict[str, Any]
    blip_vision: dict[str, Any]
    blip_extra: dict[str, Any]
    clip_text: dict[str, Any]
    clip_vision: dict[str, Any]
    clip_extra: dict[str, Any]
    bert_vocab_size: int  # vocabulary the BLIP tokenizer gets, incl. [DEC] and [ENC]
    blip_image_size: int
    clip_image_size: int


TINY = Variant(
    blip_text=dict(vocab_size=512, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                   projection_dim=32),
    blip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
    blip_extra=dict(projection_dim=32, image_text_hidden_size=32),
    clip_text=dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=77, projection_dim=32),
    clip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
    clip_extra=dict(projection_dim=32),
    bert_vocab_size=512,
    blip_image_size=32,
    clip_image_size=32,
)

# Salesforce/blip-image-captioning-base and openai/clip-vit-base-patch32, written out.
FULL = Variant(
    blip_text=dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768,
                   intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=512, projection_dim=768),
    blip_vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, image_size=384, patch_size=16, projection_dim=512,
                     layer_norm_eps=1e-5),
    blip_extra=dict(projection_dim=512, image_text_hidden_size=256),
    clip_text=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                   num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                   projection_dim=512),
    clip_vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512),
    clip_extra=dict(projection_dim=512, logit_scale_init_value=2.6592),
    bert_vocab_size=30524,
    blip_image_size=384,
    clip_image_size=224,
)

_VARIANTS = {"tiny": TINY, "full": FULL}


def _pseudo_words(n: int, seed: int) -> list[str]:
    """Deterministic pronounceable pseudo-words, distinct from each other and from _WORDS."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    seen = set(_WORDS)
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(consonants) + rng.choice(vowels)
                       for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _bert_vocab(size: int) -> dict[str, int]:
    """WordPiece vocabulary of exactly ``size`` tokens; [DEC] and [ENC] are the last two."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?")
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    base = specials + letters + pieces + [w for w in _WORDS if w not in letters]
    room = size - 2 - len(base)
    if room < 0:
        raise ValueError(f"bert vocab size {size} too small")
    tokens = base + _pseudo_words(room, seed=1) + ["[DEC]", "[ENC]"]
    return {tok: i for i, tok in enumerate(tokens)}


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary: every byte, alone and word-final, plus the two specials."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    # A few merges so common words are single tokens, as in the real tokenizer.
    for word in _WORDS[:40]:
        if not word.isascii() or len(word) < 2:
            continue
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merged = prefix + piece
            if merged not in tokens:
                merges.append((prefix, piece))
                tokens.append(merged)
            prefix = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _marker_matches(folder: Path, variant: str) -> bool:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return data == {"variant": variant, "factory_version": FACTORY_VERSION}


def _write_marker(folder: Path, variant: str) -> None:
    (folder / MARKER).write_text(json.dumps({"variant": variant,
                                             "factory_version": FACTORY_VERSION}))


def build_blip(out: Path, variant: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight BlipForConditionalGeneration + BlipProcessor into ``out``."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    spec = _VARIANTS[variant]
    if _marker_matches(out, variant):
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab(spec.bert_vocab_size)
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=512)
    text_cfg = dict(spec.blip_text, bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"],
                    pad_token_id=vocab["[PAD]"], eos_token_id=vocab["[SEP]"])
    # BlipVisionConfig's default initializer_range (1e-10) makes every image embed alike.
    vision_cfg = dict(spec.blip_vision, initializer_range=0.02)
    config = BlipConfig(text_config=text_cfg, vision_config=vision_cfg,
                        **spec.blip_extra)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    if variant == "tiny":
        # Random init at std 0.02 makes a tiny decoder emit [SEP] at once (empty captions);
        # wider output weights give varied, non-empty random words.
        with torch.no_grad():
            emb = model.text_decoder.get_input_embeddings().weight
            emb.normal_(0.0, 1.0)
            emb[vocab["[SEP]"]].fill_(0.0)
    image_processor = BlipImageProcessorPil(
        size={"height": spec.blip_image_size, "width": spec.blip_image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_marker(out, variant)
    return out


def build_clip(out: Path, variant: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight CLIPModel + CLIPProcessor into ``out``."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    spec = _VARIANTS[variant]
    if _marker_matches(out, variant):
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_cfg = dict(spec.clip_text, bos_token_id=vocab["<|startoftext|>"],
                    eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], len(vocab))
    config = CLIPConfig(text_config=text_cfg, vision_config=dict(spec.clip_vision),
                        **spec.clip_extra)
    torch.manual_seed(seed + 1)
    model = CLIPModel(config).eval()
    size = spec.clip_image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_marker(out, variant)
    return out


def build_models(out_dir: str | os.PathLike[str], variant: str = "tiny") -> dict[str, str]:
    """Build (or reuse) ``out_dir/blip`` and ``out_dir/clip``; return their paths."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    root = Path(out_dir)
    blip = build_blip(root / "blip", variant)
    clip = build_clip(root / "clip", variant)
    return {"blip": str(blip), "clip": str(clip)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="tiny")
    parser.add_argument("--out", required=True, help="folder to write blip/ and clip/ into")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = build_models(args.out, args.variant)
    print(json.dumps(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
