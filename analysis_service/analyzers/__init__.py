"""Image analysers behind one small interface, chosen by configuration."""
