"""kdlib: multi-task knowledge distillation on Ray."""
__version__ = "0.1.0"
