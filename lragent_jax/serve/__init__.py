"""An OpenAI-compatible HTTP server over the shared cache: ``python -m lragent_jax.serve``.

- ``protocol``: request validation and response shapes (``/v1/completions``,
  ``/v1/chat/completions``), OpenAI-style errors.
- ``prefix``: which row (trajectory) a request runs on: the longest token-by-token verified prefix
  is reused, rows are evicted least recently used.
- ``scheduler``: ``Engine``, the loop that owns the session and feeds its ``TurnBatcher`` with the
  requests of every client.
- ``app``: the ASGI app (Starlette); ``metrics``: ``/metrics`` in Prometheus text format.
- ``server``: ``build_server`` (model -> engine + app), ``ServerThread`` (uvicorn in a thread),
  ``load_model`` / ``random_model``.

Names are imported on first use (the HTTP stack loads only when a server is built).
"""

from lragent_jax._exports import lazy_exports

_EXPORTS = {
    "APIError": "protocol", "GenerationRequest": "protocol", "ServingContext": "protocol",
    "RowTable": "prefix", "common_prefix": "prefix",
    "Engine": "scheduler", "create_app": "app", "ServerMetrics": "metrics",
    "IdTokenizer": "server", "Server": "server", "ServerThread": "server",
    "build_server": "server", "load_model": "server", "random_model": "server",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
