"""Dassl trainers; importing this package registers them in TRAINER_REGISTRY."""
from trainers import cocoop, coop, ctpt, maple, maple_tpt, promptalign, promptsrc, promptsrc_tpt, selftpt, tpt, zsclip  # noqa: F401
