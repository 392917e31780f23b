"""Logit distillation terms beyond Hinton KD, one module each: what a head learns from the
teacher's outputs. Pure functions of logits and targets (no model, no engine), in fp32.

- `dkd`: Decoupled KD (Zhao et al., CVPR 2022), KD split into a target-class and a
  non-target-class term.
- `dist`: DIST (Huang et al., NeurIPS 2022), Pearson-correlation matching of the softened
  probabilities between classes per image and between images per class.
- `mixing`: the target of a Mixup/CutMix image from stored (unmixed) teacher outputs.
"""
