"""cap_ds: ContrAstive Pruning (CAP) for pre-trained encoders, scaled with DeepSpeed."""

__version__ = "0.1.0"

# Registers cap_ds's pruned-model classes with transformers' Auto* factories, so that after `import cap_ds` a
# physically cleaned export loads with plain `AutoModelForSequenceClassification.from_pretrained`.
from cap_ds import compression  # noqa: E402,F401
