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
