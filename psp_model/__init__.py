"""psp-fl core library: data layouts, preprocessing, models and evaluation. Imports no Flower."""

__version__ = "0.1.0"
