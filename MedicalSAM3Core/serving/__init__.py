"""The inference server (FastAPI + uvicorn): ``medsam3 serve``."""
