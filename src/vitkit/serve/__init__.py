"""`vitkit serve`: an HTTP service and a web page over a trained model (needs the `serve` extra).

`load_served_model` loads a run or checkpoint, `Predictor` owns the model and the dynamic batching,
`create_app(predictor)` is the FastAPI app that `vitkit serve` runs under uvicorn.
"""

from typing import Any

from vitkit.serve.loading import ServedModel, load_served_model
from vitkit.serve.predictor import Busy, Predictor, RequestError

__all__ = ["Busy", "Predictor", "RequestError", "ServedModel", "create_app", "load_served_model"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # FastAPI is an optional extra: import it only when the app is asked for
        from vitkit.serve.app import create_app  # noqa: PLC0415  FastAPI is the optional serve extra

        return create_app
    raise AttributeError(f"module 'vitkit.serve' has no attribute {name!r}")
