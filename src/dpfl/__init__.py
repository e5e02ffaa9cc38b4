"""dpfl: differential-privacy federated-learning primitives for PyTorch."""

__version__ = "0.1.0"

__all__ = ["__version__"]
