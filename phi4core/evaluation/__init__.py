"""Held-out evaluations of a stage's model: quick measurements on data it never trained on.

language: held-out loss / perplexity (`heldout_loss`); answers: exact-answer accuracy of a chat
model on held-out media questions (caption and transcription accuracy); stage: which of them a
stage runs, written to the stage folder as `evaluation.json`.
"""
