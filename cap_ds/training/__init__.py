"""Training: the optimizer-step loop (``trainer``) and everything it drives: the loss (``losses``), the optimizer
(``optim``), the DeepSpeed config (``ds_config``), the step plan (``plan``), pruning bound to the run
(``pruning``), encode passes and frozen teachers (``encode``, ``teachers``), cross-rank step agreement
(``agreement``), resumable checkpoints (``checkpoint``) and the gradient diagnostic (``diagnostics``).

May import: ``data``, ``cap``, ``compression``, ``ops``, ``runtime``. Never ``run`` or the entry points: the
trainer reports what happened by returning it.
"""
