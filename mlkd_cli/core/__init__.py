"""The layer every other one builds on: errors, output, process context, files, formats, RNG.

Nothing here imports data/, models/, the engine or the commands.
"""
