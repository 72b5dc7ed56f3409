"""The package version, in its own module so that every submodule can import it without a cycle."""

__version__ = "0.2.0"
