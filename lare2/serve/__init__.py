"""``lare2 serve``: a trained detector as an HTTP service with a web page (``pip install 'lare2[serve]'``).

    from lare2.serve import ServeSettings, build_app
    app = build_app(ServeSettings(run="runs/egre", device="cuda"))   # an ASGI app; uvicorn runs it

``app.py`` the routes and the app factory; ``batching.py`` the dynamic batcher that owns the model;
``guards.py`` the token, upload-size and queue-room checks; ``metrics.py`` Prometheus metrics;
``cli.py`` the command; ``static/`` the page (no external files: it works offline).
"""

from lare2.serve.app import ServeSettings, build_app

__all__ = ["ServeSettings", "build_app"]
