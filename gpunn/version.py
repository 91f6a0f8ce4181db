"""The gpunn version (one place: the package, model files and benchmark headers read it here)."""
__version__ = "0.1.0"
