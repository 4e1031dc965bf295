"""Dassl trainers; importing this package registers them in TRAINER_REGISTRY."""
from trainers import cocoop, coop, selftpt, tpt, zsclip  # noqa: F401
