"""The HTTP server: the Loop API v1 and the web pages over the engine (`core/`)."""
