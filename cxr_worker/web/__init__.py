"""The web worklist: the REST API under ``/api/v1/`` (:mod:`.api`), its authentication
(:mod:`.auth`), live updates (:mod:`.events`), the pictures (:mod:`.images`), the OpenAPI
description (:mod:`.openapi`), and the page's files (``templates/``, ``static/``: package
data), put on the service's HTTP server by :func:`.app.add_web_routes`.
"""
