"""The Loop API v1 contract: the request, response and event models every layer shares.

It imports nothing of loopbridge: the engine, the server, the client and the adapters
all speak it.
"""
