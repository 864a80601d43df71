"""fleet agent: runs commands received over MQTT and reports their results."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fleet-agent")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
