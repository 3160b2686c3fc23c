"""The web dashboard for the people who run the gateway (its own listener, ADMIN_LISTEN).

Kept free of imports: document worker processes import `thumbs` from here and must not pull in
aiohttp or jinja2 with it.
"""
