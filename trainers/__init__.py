"""Dassl trainers; importing this package registers them in TRAINER_REGISTRY."""
from trainers import coop, selftpt, zsclip  # noqa: F401
