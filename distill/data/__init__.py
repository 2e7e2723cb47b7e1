from . import lm, text  # noqa: F401  (register the `text_lm` and `text` datasets)
from .datasets import DataBundle, load_data
from .transforms import augment, has_augmentation

__all__ = ["DataBundle", "load_data", "augment", "has_augmentation"]
