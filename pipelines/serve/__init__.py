"""The storymem HTTP endpoint on Ray Serve (`storymem serve`; docs/serve.md).

One module per idea:

    settings       ServeSettings: the frozen spec every deployment receives
    app            the FastAPI ingress, its error handlers, `build_app`
    generation     the generation deployment (model once per replica)
    scorers        the shared CLIP and gate deployments and their local proxies
    single_shot    POST /v1/shots through the story shot step (ShotStep)
    sessions       session records in storage; session_state: live StorySessions
    jobs           story job records; job_runner: rendering them with the story runner
    images         request images -> arrays; limits: request limits; auth: API keys
    errors         ServeRequestError (typed, crosses the Ray hop whole)
    request_guard  auth and body-size checks before any route
    schemas        request/response bodies (the OpenAPI schema)
    pipeline_lock  one model call at a time per replica
    metrics        the app's own Prometheus metrics
"""
