"""Dassl datasets in CoOp's on-disk layouts; importing this package registers them.

Run from the repository root (as CoOp's train.py is): this folder is not installed into
site-packages, where it would shadow the Hugging Face package of the same name.
"""
