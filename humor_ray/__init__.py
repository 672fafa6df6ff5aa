"""humor_ray: teaching language models to be funny from human preferences, on Ray."""

__version__ = "0.1.0"
