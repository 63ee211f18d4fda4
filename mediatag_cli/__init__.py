"""The ``mediatag`` command (``main.main``): serves the services and calls them."""

__all__ = ["main"]
