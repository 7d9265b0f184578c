"""The Loop API v1: the HTTP server, its Python client, the command line and the stand-in model."""
