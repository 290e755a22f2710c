"""The version this build of Outpost carries; the cloud and the edge report the same one."""

__version__ = "0.1.0"
