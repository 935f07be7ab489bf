"""vfu-inspect: analyzer and man-in-the-middle proxy for vfio-user."""

__version__ = "0.1.0"
