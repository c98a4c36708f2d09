"""The package version, in a module of its own: what every other module may import."""
__version__ = "0.2.0"
