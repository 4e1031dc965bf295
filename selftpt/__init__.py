"""Self-TPT: efficient test-time prompt tuning for CLIP, as a Dassl/CoOp plug-in."""

__version__ = "0.1.0"
