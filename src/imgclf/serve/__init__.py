"""``imgclf serve``: the runs behind HTTP (FastAPI on uvicorn) and a web page to try them."""

from imgclf.serve.app import Predictor, create_app, serve, start_in_thread

__all__ = ["Predictor", "create_app", "serve", "start_in_thread"]
