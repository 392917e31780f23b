"""Training only: the run's config, planning (run files, image config, card, the checks before any
work), launching (single process, spawned DDP, torchrun), precision, the loop and its optimisers
and schedules, the trainer and its checkpoints, and the two tasks (teacher training, distillation)
with the distillation's teacher sources behind one seam (`teacher_sources.py`).
It may import `core`, `data`, `models` and `losses`, never `passes` (forward-only jobs over a
split, which sit above it and reuse its launcher), services, `commands`, Typer or rich.
"""
