"""cap_ds: ContrAstive Pruning (CAP) for pre-trained encoders, scaled with DeepSpeed."""

__version__ = "0.1.0"
