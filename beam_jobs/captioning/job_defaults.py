"""The job's command-line defaults and allowed values, in one place.

Pure Python (no Beam, torch or pyarrow): the job's options read it, and so do the Airflow
side's settings (plugins/caption_platform/config.py), so a default changed here changes
what a DAG run and a by-hand run both get.
"""

from __future__ import annotations

BLIP_MODEL = "Salesforce/blip-image-captioning-base"
CLIP_MODEL = "openai/clip-vit-base-patch32"
DECODINGS = ("beam", "sample")
DEVICES = ("cpu", "cuda")

NUM_CAPTIONS = 3
DECODING = "beam"
NUM_BEAMS = 5
MAX_NEW_TOKENS = 30
BLIP_BATCH_SIZE = 8
CLIP_BATCH_SIZE = 8
DEVICE = "cpu"
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
# Decode large images only down to this shorter side: BLIP-base/large take 384 px, CLIP
# ViT-B/32 224 px. Raise it for models with larger inputs; 0 decodes at full size.
DECODE_MIN_SIDE = 384
