"""Image analysers behind one small interface, chosen by configuration."""

__all__ = ["base", "registry"]
