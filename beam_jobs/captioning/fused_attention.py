"""BLIP's vision self-attention through torch's fused ``scaled_dot_product_attention``.

transformers' ``BlipAttention`` (the image encoder, 577 tokens at 384 px) writes the full
577x577 score matrix per head, softmaxes it and reads it back: memory traffic that the fused
kernel avoids. Same formula (softmax(QK^T * scale) V with the same scale), different
summation order: outputs equal within float rounding (tested in
``tests/beam_jobs/test_blip_decoding.py``). Attention probabilities are not returned (the
captioning job never asks for them).
"""

from __future__ import annotations

from typing import Any

_CLASS: list[type] = []


def _fused_class() -> type:
    if _CLASS:
        return _CLASS[0]
    import torch
    from transformers.models.blip.modeling_blip import BlipAttention

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

    _CLASS.append(FusedBlipAttention)
    return FusedBlipAttention


def fuse_vision_attention(model: Any) -> Any:
    """Swap the class of every ``BlipAttention`` in ``model``'s image encoder (same weights)."""
    from transformers.models.blip.modeling_blip import BlipAttention

    cls = _fused_class()
    for module in model.vision_model.modules():
        if type(module) is BlipAttention:
            module.__class__ = cls
    return model
