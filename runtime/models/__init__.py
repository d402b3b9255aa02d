"""PyTorch model definitions. Module names mirror the official checkpoint keys."""
