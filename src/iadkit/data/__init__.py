"""Datasets: layout readers, samples, evaluation settings, loaders and generated test data."""

from .dataset import Batch, ImageDataset, Preprocess, make_loader
from .generate import generate_dataset
from .image_io import read_image, read_mask
from .layouts import LAYOUTS, detect_layout, load_dataset, read_folder
from .samples import ANOMALOUS, NORMAL, Sample, SampleSet
from .settings import SETTINGS, Task, make_tasks

__all__ = [
    "ANOMALOUS", "Batch", "ImageDataset", "LAYOUTS", "NORMAL", "Preprocess", "SETTINGS", "Sample",
    "SampleSet", "Task", "detect_layout", "generate_dataset", "load_dataset", "make_loader",
    "make_tasks", "read_folder", "read_image", "read_mask",
]
