"""The labeling app's routers: ``pages`` (sign-in and rater pages), ``admin`` (the dashboard)
and ``api`` (the JSON API under ``/api/v1``)."""
