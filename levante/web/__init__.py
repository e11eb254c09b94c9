"""Team Spaces in the browser, served by `levante serve` on its own port (see app.py)."""

from levante.web.app import WebConfig, install

__all__ = ["WebConfig", "install"]
