"""Model zoo: every model is an nn.Sequential of named layers, cut after one of them."""

from sfl_ray.models.split import ModelParts, activation_shape, build_model, build_parts, split_model

__all__ = ["ModelParts", "activation_shape", "build_model", "build_parts", "split_model"]
