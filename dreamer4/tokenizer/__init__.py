"""Causal video tokenizer: model.py (the network), train.py (stage training and evaluation)."""
