"""The browser pages of `loopbridge serve`: log in, a user's loops, one loop live.

Pages are rendered by Jinja2 on the server; a little plain JavaScript (served
from `static/`, with vendored libraries: no build step, no CDN) reads the loop
through the public Loop API and follows its events. See docs/web.md.
"""

from bridge.server.web.links import grant_reader, mint
from bridge.server.web.pages import mount

__all__ = ["grant_reader", "mint", "mount"]
