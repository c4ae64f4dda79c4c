"""Medical SAM3 engine: text-prompted 3D segmentation of CT/MR volumes.

Importing this package is cheap and torch-free. The torch-free part of the engine (prompt
dictionary, volume and result types, progress protocol, errors) lives in
``MedicalSAM3Core.common`` so the 3D Slicer module can import it without a GPU environment.
Everything that needs torch is under ``MedicalSAM3Core.inference`` and
``MedicalSAM3Core.preprocessing``.
"""

__version__ = "0.1.0"
