"""Model registry, fetching and loading (see :func:`workbench.models.loader.load`)."""
