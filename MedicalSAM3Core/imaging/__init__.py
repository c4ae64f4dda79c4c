"""Reading and writing medical images (SimpleITK, nowhere else in the project)."""
