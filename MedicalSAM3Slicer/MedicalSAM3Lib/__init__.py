"""Scene logic of the Medical SAM3 Slicer module (MRML + numpy + vtk only; no Qt, no torch)."""
