"""The shared engine: launching (single, spawned DDP, torchrun), the epoch runner, checkpoints."""
