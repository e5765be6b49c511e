"""The web console: a page at ``/`` on the REST port that shows what the server serves.

The page (``static/``, plain files: no build step, nothing fetched from elsewhere) calls the
server as any client does: the Open Inference Protocol's REST API for samples, reconstructions,
latents and scores, and two read-only JSON endpoints for what OIP lacks, ``GET /v2/console/models``
(every model, its versions, labels and manifests in brief) and ``GET /v2/console/live`` (the
service's call counters). Those two are part of the REST API whether or not the page is served.
"""
