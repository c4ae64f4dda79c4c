"""Preprocessing shared by inference and training (one code path, so a model is always fed
what it was trained on)."""
