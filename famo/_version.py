"""The version of famo: its single source, read by pyproject.toml and by ``famo.__version__``."""

__version__ = "0.3.0"
