"""BLIP's image encoder, faster, computing what stock BLIP computes.

Two named changes, swapped in by :func:`speed_up_vision` (same weights, same module tree):

1. **Fused self-attention.** transformers' ``BlipAttention`` (577 tokens at 384 px) writes
   the full 577x577 score matrix per head, softmaxes it and reads it back: memory traffic
   that torch's ``scaled_dot_product_attention`` avoids. Same formula (softmax(QK^T * scale)
   V, same scale), different summation order.
2. **Images in small chunks.** A batch of 12 images makes activations of 21 to 85 MB per
   layer: they miss the CPU caches, and glibc maps and page-faults every one of them afresh
   (its mmap threshold tops out at 32 MB). :class:`ChunkedBlipEncoder` runs the encoder
   layers on ``chunk_images`` images at a time (images are independent in the encoder), so
   the activations stay small and are reused. On a GPU the whole batch goes through at
   once (:func:`chunk_images_for`): small products would leave the card idle.

Outputs equal stock within float rounding (``tests/beam_jobs/test_blip_decoding.py``).
Attention probabilities and per-layer hidden states are not returned: the captioning job
never asks for them.
"""

from __future__ import annotations

from typing import Any

# 2 images = 1,154 rows per matmul: large enough for full-speed matmuls, small enough that
# the largest activation (1,154 x 3,072 floats, 14 MB) is reused, not page-faulted.
CHUNK_IMAGES = 2

_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    import torch
    from transformers.modeling_outputs import BaseModelOutput
    from transformers.models.blip.modeling_blip import BlipAttention, BlipEncoder

    class FusedBlipAttention(BlipAttention):
        def forward(self, hidden_states: Any, **kwargs: Any) -> tuple[Any, None]:
            bsz, tokens, dim = hidden_states.size()
            qkv = (self.qkv(hidden_states)
                   .reshape(bsz, tokens, 3, self.num_heads, dim // self.num_heads)
                   .permute(2, 0, 3, 1, 4))
            context = torch.nn.functional.scaled_dot_product_attention(
                qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0,
                scale=self.scale)
            return self.projection(context.permute(0, 2, 1, 3).reshape(bsz, tokens, dim)), None

    class ChunkedBlipEncoder(BlipEncoder):
        chunk_images = CHUNK_IMAGES

        def forward(self, inputs_embeds: Any, **kwargs: Any) -> Any:
            step = self.chunk_images
            if not step or inputs_embeds.shape[0] <= step:
                return super().forward(inputs_embeds, **kwargs)
            parts = [super(ChunkedBlipEncoder, self).forward(inputs_embeds[i:i + step],
                                                             **kwargs).last_hidden_state
                     for i in range(0, inputs_embeds.shape[0], step)]
            return BaseModelOutput(last_hidden_state=torch.cat(parts))

    _CLASSES.update(FusedBlipAttention=FusedBlipAttention,
                    ChunkedBlipEncoder=ChunkedBlipEncoder)
    return _CLASSES


def chunk_images_for(device: str) -> int:
    """Images per chunk through the encoder on ``device``: :data:`CHUNK_IMAGES` on CPU, 0
    (the whole batch at once) on a GPU, where a product needs many rows to fill the card."""
    return CHUNK_IMAGES if device.split(":", 1)[0] == "cpu" else 0


def speed_up_vision(model: Any, chunk_images: int = CHUNK_IMAGES) -> Any:
    """Swap in the fused attention and the chunked encoder in ``model``'s image encoder
    (``chunk_images`` 0: no chunks)."""
    from transformers.models.blip.modeling_blip import BlipAttention, BlipEncoder

    classes = _classes()
    encoder = model.vision_model.encoder
    if type(encoder) is BlipEncoder:
        encoder.__class__ = classes["ChunkedBlipEncoder"]
    encoder.chunk_images = chunk_images
    for module in encoder.modules():
        if type(module) is BlipAttention:
            module.__class__ = classes["FusedBlipAttention"]
    return model
