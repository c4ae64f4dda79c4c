"""Model loading and volume inference (needs torch and transformers)."""
