"""sfl_ray: split federated learning on Ray."""

__version__ = "0.1.0"
