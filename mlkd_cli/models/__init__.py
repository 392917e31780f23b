"""Models, built and read back: `factory` (timm model construction by name, pretrained weights
and their offline sources, trained checkpoints loaded as plain timm models), `student` (the
multi-exit student: exit heads after the chosen stages, `build_student`, feature adapters),
`teacher` (a teacher or a weighted ensemble at its own input size), `ensemble_config` (the
ensemble file, the original's JSON verbatim), `exits` (the `<name>_exits.pth` file format) and
`norms` (GroupNorm in the faster layout on a CPU). It may import torch, timm and `core`; the
pure parts of early exit (`anytime.rules`, `costs`, `staged`) share its layer. Never `data`,
`losses`, the engine or anything above (tests/meta/test_layers.py holds it).
"""
