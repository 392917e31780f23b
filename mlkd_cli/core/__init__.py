"""The layer every other one builds on: errors, output, process context, files, formats, RNG,
and typed configs made from loose values (`coerce`: a preset and the flags, merged).

Nothing here imports data/, models/, the engine or the commands.
"""
