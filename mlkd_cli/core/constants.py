"""Values more than one layer shares."""

from __future__ import annotations

# Normalisation for models whose card gives none (timm's default for most non-ImageNet models).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
