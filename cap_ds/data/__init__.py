"""The inputs: the GLUE tasks (``tasks``), reading their splits from TSV folders or the hub (``glue``), rows to
batches and the run's loaders (``batches``), the task metrics (``metrics``), and the pre-trained models that
read them (``models``: student and teacher loading, config overrides, the sentence vector).

May import: ``cap`` (the rank shards a sampler follows) and ``runtime``.
"""
