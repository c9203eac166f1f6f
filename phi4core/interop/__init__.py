"""Conversion between phi4core checkpoints and Hugging Face folders."""
