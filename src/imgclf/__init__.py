"""imgclf: image classification from a folder of images to an HTML report."""

__version__ = "0.1.0"
