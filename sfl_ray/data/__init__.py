"""Data: sources (HF datasets, built-in sets), partitioners, per-client batches."""

from sfl_ray.data.batches import client_batches
from sfl_ray.data.partition import label_histograms, partition
from sfl_ray.data.sources import ArrayDataset, load_source

__all__ = ["ArrayDataset", "client_batches", "label_histograms", "load_source", "partition"]
