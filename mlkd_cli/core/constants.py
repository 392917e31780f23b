"""Values more than one layer shares."""

from __future__ import annotations

# Normalisation for models whose card gives none (timm's default for most non-ImageNet models).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
# The largest input side mlkd accepts anywhere (flags, cards, ensemble files): 4096 px is past
# any classifier's training size, and a 3 x 4096^2 fp32 image is already 200 MB.
MAX_IMG_SIZE = 4096
# The most classes a model card or a soft-label store may record (ImageNet-21k has 21,841).
MAX_CLASSES = 100_000
# A soft-label store (labelling defaults the flags and presets show without loading the labeller).
SHARD_SIZE = 1_000  # images per shard: the unit a stopped labelling redoes
DEFAULT_VIEWS = 8  # views per image: FKD's range is 8-16; more cost label time and disk
# `mlkd export`: the formats it writes, and --int8's defaults and targets.
FORMATS = ("safetensors", "onnx", "torchscript")
DEFAULT_CALIBRATION_IMAGES = 512
DEFAULT_MIN_AGREEMENT = 99.0
INT8_TARGETS = ("auto", "avx2", "avx512", "vnni")  # --int8-target's choices
