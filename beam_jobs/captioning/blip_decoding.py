"""Faster BLIP beam search that computes the same captions as stock ``generate``.

Three named changes, all switched on only for the cache object :func:`beam_search_cache`
returns (any other call of the model runs transformers' own code path unchanged):

1. **Cross-attention keys/values once per image.** ``generate`` repeats the image embeddings
   for every beam, so stock BLIP projects the 577 image tokens to keys and values once per
   beam (identical results, five times the work at 5 beams) and then, at every step, reads
   five identical copies. :class:`SharedCrossAttention` projects one copy per image, keys and
   values in one matmul (their weights are stored side by side), and attends all beams of
   that image against it in one batched matmul: the same dot products, grouped differently
   (results equal within float rounding). Keys are kept transposed, ``[dim, tokens]``, so
   the per-step score matmul reads them in order.
2. **A self-attention KV cache that is written in place.** ``DynamicLayer`` grows by
   ``torch.cat`` (a full copy of the cache per layer per step) and beam search reorders it
   (another copy). :class:`PreallocatedLayer` allocates the whole length once, writes each
   step into it, and reorders by gathering into a second buffer (one copy, no temporary).
3. **The image embeddings reach the cache, not the decoder's inputs.** :func:`generate` is
   ``BlipForConditionalGeneration.generate`` with one difference: the decoder gets a
   one-token stand-in for the image embeddings, so ``generate`` has nothing large to repeat
   per beam, and the shared cross-attention reads the one copy per image from the cache.
   Those keys and values are projected two images at a time on CPU (all at once on a GPU,
   where small products leave the card idle: :func:`project_images_for`) straight into the
   cache tensors, a product shape the matmul kernels run at full speed, with no per-layer
   temporary of all images' keys and values to map and fault in afresh.

Nothing else changes: the self-attention, the feed-forward layers, the LM head and
transformers' beam search run as they are.

The cross-attention entries are never reordered: beams move only within their own image and
those entries are per image, so reordering them would be a no-op copy.

Equality with stock ``generate`` is tested in ``tests/beam_jobs/test_blip_decoding.py``.
torch and transformers are imported inside functions (this module is imported where the
pipeline is built, which may have neither).
"""

from __future__ import annotations

import math
from typing import Any

#: Images whose keys/values are projected in one product (1,154 rows at BLIP's 577 tokens).
PROJECT_IMAGES = 2

_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    """Build the torch/transformers subclasses once, on first use."""
    if _CLASSES:
        return _CLASSES
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    class PreallocatedLayer(DynamicLayer):
        """Self-attention keys/values in buffers sized for the whole generation."""

        def __init__(self, max_len: int) -> None:
            super().__init__()
            self.max_len = max_len
            self.length = 0

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            n, heads, _, dim = key_states.shape
            self.device = key_states.device
            # Two of each: reorder_cache gathers from one into the other.
            self.key_buffers = key_states.new_empty((2, n, heads, self.max_len, dim))
            self.value_buffers = value_states.new_empty((2, n, heads, self.max_len, dim))
            self.current = 0
            self.length = 0
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any
                   ) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.length, self.length + key_states.shape[-2]
            if end > self.max_len:
                raise RuntimeError(f"KV cache holds {self.max_len} tokens, asked for {end}")
            keys, values = self.key_buffers[self.current], self.value_buffers[self.current]
            keys[:, :, start:end].copy_(key_states)
            values[:, :, start:end].copy_(value_states)
            self.length = end
            self.keys = keys[:, :, :end]
            self.values = values[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def get_max_length(self) -> int:
            return self.max_len

        def reorder_cache(self, beam_idx: Any) -> None:
            if self.get_seq_length() > 0:
                idx = beam_idx.to(self.device)
                other, end = 1 - self.current, self.length
                self.keys = torch.index_select(self.keys, 0, idx,
                                               out=self.key_buffers[other][:, :, :end])
                self.values = torch.index_select(self.values, 0, idx,
                                                 out=self.value_buffers[other][:, :, :end])
                self.current = other

        def reset(self) -> None:
            self.length = 0
            self.is_initialized = False
            self.keys = self.values = None

    class BeamSearchCache(EncoderDecoderCache):
        """EncoderDecoderCache for BLIP beam search: see the module docstring.

        The per-image cross-attention keys (transposed) and values live in ``cross_kv``,
        not in ``cross_attention_cache``, which stays empty. ``image_states`` is the one
        contiguous copy of each image's embeddings that every layer projects them from.
        """

        def __init__(self, text_config: Any, num_beams: int, max_len: int,
                     project_images: int) -> None:
            self_cache = DynamicCache(config=text_config)
            self_cache.layers = [PreallocatedLayer(max_len) for _ in self_cache.layers]
            super().__init__(self_cache, DynamicCache(config=text_config))
            self.num_beams = num_beams
            self.project_images = project_images  # per key/value product; 0: all at once
            self.image_states: Any = None  # one row per image, contiguous, set at step 1
            self.cross_kv: dict[int, tuple[Any, Any]] = {}

        def reorder_cache(self, beam_idx: Any) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    class SharedCrossAttention(BlipTextSelfAttention):
        """BLIP's cross-attention, computing image keys/values once per image."""

        def forward(self, hidden_states: Any, attention_mask: Any = None,
                    encoder_hidden_states: Any = None, encoder_attention_mask: Any = None,
                    cache: Any = None, **kwargs: Any) -> tuple[Any, Any]:
            if "past_key_values" in kwargs and cache is None:
                cache = kwargs.pop("past_key_values")
            if not isinstance(cache, BeamSearchCache) or encoder_hidden_states is None:
                return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                       encoder_attention_mask, cache=cache, **kwargs)
            group = cache.num_beams
            n, length, _ = hidden_states.shape
            images = n // group
            heads, dim = self.num_attention_heads, self.attention_head_size
            # [n, T, heads*dim] -> [images, heads, beams*T, dim], rows ordered (beam, token).
            # Scaled here rather than the scores after (64 values per query row, not 577),
            # and the same numbers when 1/sqrt(dim) is a power of two (dim 64 in BLIP).
            query = (self.query(hidden_states) * (1.0 / math.sqrt(dim)))
            query = (query.view(images, group, length, heads, dim)
                     .permute(0, 3, 1, 2, 4).reshape(images, heads, group * length, dim))
            if self.layer_idx not in cache.cross_kv:
                if cache.image_states is None:  # stock generate: beams of an image adjacent
                    cache.image_states = encoder_hidden_states[::group].contiguous()
                cache.cross_kv[self.layer_idx] = self._image_keys_values(
                    cache.image_states, cache.project_images)
            keys_t, values = cache.cross_kv[self.layer_idx]
            scores = torch.matmul(query, keys_t)
            if encoder_attention_mask is not None:
                mask = encoder_attention_mask[::group]
                if mask.shape[-2] > 1:
                    mask = mask.repeat(1, 1, group, 1)
                scores = scores + mask.to(scores.device)
            probs = torch.nn.functional.softmax(scores, dim=-1)
            context = torch.matmul(self.dropout(probs), values)  # [images, heads, g*T, dim]
            context = (context.view(images, heads, group, length, dim)
                       .permute(0, 2, 3, 1, 4).reshape(n, length, heads * dim))
            return context, probs

        def _image_keys_values(self, per_image: Any, project_images: int) -> tuple[Any, Any]:
            """Keys as ``[images, heads, dim, tokens]`` and values as ``[.., tokens, dim]``.

            Projected ``project_images`` images at a time (0: all) straight into the two
            cache tensors: on CPU the products keep a shape matmul kernels run at full
            speed, and the temporary (7 MB at 2 images, 42 MB at 12) is reused instead of
            being mapped afresh for every layer.
            """
            heads, dim = self.num_attention_heads, self.attention_head_size
            images, tokens, _ = per_image.shape
            step = project_images or images
            keys_t = per_image.new_empty((images, heads, dim, tokens))
            values = per_image.new_empty((images, heads, tokens, dim))
            for i in range(0, images, step):
                part = per_image[i:i + step]
                kv = self.key_value(part).view(*part.shape[:-1], 2, heads, dim)  # [n, t, 2, h, d]
                keys_t[i:i + step].copy_(kv[:, :, 0].permute(0, 2, 3, 1))
                values[i:i + step].copy_(kv[:, :, 1].permute(0, 2, 1, 3))
            return keys_t, values

    _CLASSES.update(PreallocatedLayer=PreallocatedLayer, BeamSearchCache=BeamSearchCache,
                    SharedCrossAttention=SharedCrossAttention)
    return _CLASSES


def share_cross_attention(model: Any) -> Any:
    """Let ``model`` (``BlipForConditionalGeneration``) use :class:`SharedCrossAttention`.

    Swaps the class of each decoder cross-attention module (same weights, same module tree);
    it behaves as stock BLIP unless ``generate`` is given :func:`beam_search_cache`.
    """
    cls = _classes()["SharedCrossAttention"]
    for layer in model.text_decoder.bert.encoder.layer:
        cross = getattr(layer, "crossattention", None)
        if cross is not None:
            cross.self.__class__ = cls
            _stack_key_value(cross.self)
    return model


def _stack_key_value(module: Any) -> None:
    """Add ``key_value``: the key and value projections as one ``[2*hidden, hidden]`` Linear.

    The key and value parameters become views of its weight and bias: one matmul projects
    both, no copy.
    """
    import torch

    key, value = module.key, module.value
    rows = key.weight.shape[0]
    with torch.no_grad():
        weight = torch.cat([key.weight, value.weight])
        bias = torch.cat([key.bias, value.bias])
    key_value = torch.nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    key_value.weight = torch.nn.Parameter(weight, requires_grad=False)
    key_value.bias = torch.nn.Parameter(bias, requires_grad=False)
    module.key_value = key_value
    key.weight = torch.nn.Parameter(weight[:rows], requires_grad=False)
    value.weight = torch.nn.Parameter(weight[rows:], requires_grad=False)
    key.bias = torch.nn.Parameter(bias[:rows], requires_grad=False)
    value.bias = torch.nn.Parameter(bias[rows:], requires_grad=False)


def generate(model: Any, cache: Any, pixel_values: Any, input_ids: Any = None,
             attention_mask: Any = None, **generate_kwargs: Any) -> Any:
    """``BlipForConditionalGeneration.generate`` with the image embeddings handed to ``cache``.

    The same steps as stock (image encoder, prompt ids with BOS first and the trailing SEP
    dropped, the text decoder's ``generate``), except what the decoder is given as encoder
    states: stock passes the ``[images, 577, hidden]`` embeddings, which ``generate`` then
    repeats once per beam (106 MB written for 12 images at 5 beams, and read once more to
    take one copy per image back); here :class:`SharedCrossAttention` reads them from
    ``cache.image_states`` and the decoder gets a one-token stand-in to repeat. The image
    attention mask stock builds is all ones (nothing masked), and so is the stand-in's.
    """
    import torch

    image_embeds = model.vision_model(pixel_values=pixel_values)[0]
    cache.image_states = image_embeds
    stand_in = image_embeds[:, :1]
    stand_in_mask = torch.ones(stand_in.shape[:-1], dtype=torch.long, device=stand_in.device)
    text = model.config.text_config
    if input_ids is None:
        input_ids = torch.tensor([[model.decoder_input_ids, text.eos_token_id]],
                                 device=image_embeds.device).repeat(image_embeds.shape[0], 1)
    input_ids[:, 0] = text.bos_token_id
    attention_mask = attention_mask[:, :-1] if attention_mask is not None else None
    return model.text_decoder.generate(
        input_ids=input_ids[:, :-1], eos_token_id=text.sep_token_id,
        pad_token_id=text.pad_token_id, attention_mask=attention_mask,
        encoder_hidden_states=stand_in, encoder_attention_mask=stand_in_mask, cache=cache,
        **generate_kwargs)


def project_images_for(device: str) -> int:
    """Images per key/value product on ``device``: :data:`PROJECT_IMAGES` on CPU, 0 (all
    at once) on a GPU."""
    return PROJECT_IMAGES if device.split(":", 1)[0] == "cpu" else 0


def beam_search_cache(model: Any, num_beams: int, max_len: int,
                      project_images: int | None = None) -> Any:
    """The cache to pass as ``generate(cache=...)`` for beam search with ``num_beams``.

    ``max_len`` is the longest sequence generate may reach (prompt plus new tokens).
    ``project_images``: images per key/value product; None chooses by the model's device
    (:func:`project_images_for`), which tests override to run the GPU branch on a CPU.
    """
    if project_images is None:
        project_images = project_images_for(next(model.parameters()).device.type)
    return _classes()["BeamSearchCache"](model.config.text_config, num_beams, max_len,
                                         project_images)
