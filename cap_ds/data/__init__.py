"""The inputs: GLUE tasks and their data (``glue``: specs, readers, tokenisation, collation, loaders, metrics)
and the pre-trained models that read them (``models``: student and teacher loading, config overrides, the
sentence vector).

May import: ``cap`` (the rank shards a sampler follows) and ``runtime``.
"""
