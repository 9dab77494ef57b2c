"""augbench: which extra training images help a classifier most — generated or retrieved?"""

__version__ = "0.1.0"
