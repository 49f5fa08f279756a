"""OpenAI-compatible server over the engine: continuous batching, embeddings, metrics and a Redis cache.

``daert serve -m smollm2-135m-instruct`` (see ``docs/serve.md``); in Python::

    from workbench.serve import ServeConfig, Server, create_app
    app = create_app(Server(engine, ServeConfig(model="smollm2-135m-instruct")))
"""

from __future__ import annotations

__all__ = ["ServeConfig", "Server", "create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from workbench.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'workbench.serve' has no attribute {name!r}")
