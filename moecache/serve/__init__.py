"""``moecache serve``: an OpenAI-compatible HTTP server for an offloaded model.

``textgen`` (the decode loop and sampling), ``scheduler`` (one request at a time, a bounded line),
``metrics`` (Prometheus text), ``app`` (the FastAPI routes). ``moecache.cli.serve`` loads the model
and runs the app under uvicorn.
"""

from .app import create_app
from .textgen import SamplingParams, TextGenerator

__all__ = ["create_app", "TextGenerator", "SamplingParams"]
