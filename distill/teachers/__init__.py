"""Teacher sources: the teacher run online on each batch, or its outputs read back from the on-disk cache.
Both give `TeacherOutputs` for (inputs, sample indices); the objective reads any number of them."""
from .cache import CachedOutputs, cache_key, default_cache_dir, load_or_build
from .online import online_source, teacher_forward

__all__ = ["CachedOutputs", "cache_key", "default_cache_dir", "load_or_build", "online_source", "teacher_forward"]
