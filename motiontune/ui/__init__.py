"""`motiontune ui`: a local web app to edit configs, inspect datasets and start, stop and watch training."""

from .server import create_app, run_server

__all__ = ["create_app", "run_server"]
