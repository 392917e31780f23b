"""Datasets and what feeds a run: `registry` (dataset names, splits, the validation hold-out,
label budgets), `sources` (on-disk readers and the embedded digits), `transforms` (the image
config and its transforms), `loaders` and `device` (batches on the CPU or augmented on the
device), and the soft-label store: `softlabels` (the store and its manifest), `views` (the
numbered augmented views it records) and `replay` (its outputs replayed as training targets,
Mixup's blend included). It may import torch, torchvision, timm's data helpers and `core`; never
`models`, `losses`, the engine or anything above (tests/meta/test_layers.py holds it).
"""
