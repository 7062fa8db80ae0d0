"""The storymem HTTP endpoint on Ray Serve (`storymem serve`; docs/serve.md).

One module per idea:

    settings       ServeSettings: the frozen spec every deployment receives
    app            the FastAPI ingress, its error handlers, `build_app`
    generation     the generation deployment (model once per replica)
    scorers        the shared CLIP and gate deployments and their local proxies
    single_shot    POST /v1/shots through the story shot step (ShotStep)
    sessions       session records in storage; session_state: live StorySessions (one
                   shot at a time per session, across replicas)
    jobs           story job records and claims; job_runner: submitting, running and
                   adopting them; job_executor: the bounded story-job executor
    usage          per-key usage records (quotas) updated under a lease
    retention      TTLs per kind and the sweep that applies them
    images         request images -> arrays; limits: request limits and quotas;
                   auth: API keys
    errors         ServeRequestError (typed, crosses the Ray hop whole); sanitised faults
    request_guard  auth, body-size and JSON-shape checks before any route (json_meter);
                   proxy_guard: the same guard inside Serve's HTTP proxy
    schemas        request/response bodies (the OpenAPI schema)
    pipeline_lock  one model call at a time per replica
    metrics        the app's own Prometheus metrics
"""
