"""Datasets: the registry, on-disk readers, the embedded digits set, transforms and loaders."""
