"""Torch-free building blocks shared by the engine, the CLI, the server and the Slicer module.

Nothing in this package may import torch, transformers or SimpleITK (a test enforces it).
"""
