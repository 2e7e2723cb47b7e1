from . import text  # noqa: F401  (registers the `text` dataset)
from .datasets import DataBundle, load_data
from .transforms import augment, has_augmentation

__all__ = ["DataBundle", "load_data", "augment", "has_augmentation"]
