"""Forward-only jobs over a split: a model or an ensemble is run, nothing is trained. `logits`
(the shared pass: a split's dataset, one model's logits gathered over every rank, the data
folder and image config a checkpoint's card implies), `evaluation` (the `mlkd eval` job on a
checkpoint or an ensemble file), `ensemble` (every member's logits on a split, the fitted weights
and temperature, the ensemble table) and `labeling` (`mlkd teacher label`: a teacher's outputs
for K views of each training image, written into the soft-label store). They sit above the
engine and may import `core`, `data`, `models` and from `engine` only what runs any job (the
launcher, precision, planning checks, config, provenance), never a training task, `losses`,
`commands`, Typer or rich. Services (the pipeline, the study, export, anytime) and commands
import them; the engine never does. This file imports nothing, so naming the package is free.
"""
