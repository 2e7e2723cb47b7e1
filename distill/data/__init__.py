from . import completions, lm, text  # noqa: F401  (register `completions`, `text_lm` and `text`)
from .datasets import DataBundle, load_data
from .transforms import augment, has_augmentation

__all__ = ["DataBundle", "load_data", "augment", "has_augmentation"]
