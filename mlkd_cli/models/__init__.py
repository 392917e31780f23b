"""Models: timm model construction, teachers and (later) the multi-exit student."""
