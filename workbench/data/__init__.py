"""Offline text corpora and fixed-window tokenization."""
