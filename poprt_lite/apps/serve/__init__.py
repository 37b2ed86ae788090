"""`poprt-lite serve`: packed inference as an HTTP service (FastAPI, uvicorn, prometheus-client;
`pip install 'poprt-lite[serve]'`).

`Engine` (engine.py) holds the runner, the interface and the tokenizer; `create_app(engine, limits)`
(app.py, oip.py) is the FastAPI application, which another host (Ray Serve's `@serve.ingress`) can
wrap as it is; `launcher.serve(...)` runs it in this process under uvicorn, with the drain on
SIGTERM / SIGINT.
"""

from poprt_lite.apps.serve.app import Limits, ServeError, create_app
from poprt_lite.apps.serve.engine import Engine, Head

__all__ = ["Engine", "Head", "Limits", "ServeError", "create_app"]
