"""Datasets: the registry, on-disk readers, the embedded digits set, transforms and loaders; the
soft-label store, its numbered views and their replay as training targets."""
