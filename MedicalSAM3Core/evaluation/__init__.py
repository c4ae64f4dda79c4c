"""Accuracy of segmentations: metrics (Dice, IoU, NSD, HD95) and ``medsam3 evaluate``."""
