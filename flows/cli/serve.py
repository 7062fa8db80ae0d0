"""`storymem serve`: the HTTP endpoint (Ray Serve) with the model flags of `render`.

The flags become one `ServeSettings` spec here, before Ray starts: the spec checks its own
bounds (only `--port` and `--references` are checked here), the API keys are read (only
their digests are kept), and the model flags are resolved into the `RenderSpec` `storymem
render` would build from them (`model_flags.render_spec_from_args`, with an accelerator
when the generation replicas get GPUs) - so a story job or a session renders with the same
RenderConfig, hence the same config hash and bytes, as `render` with the same flags. Every
replica receives that spec.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

from flows.cli.cli_logging import setup_cli_logging
from flows.cli.model_flags import ArgumentsError, add_model_arguments, render_spec_from_args

log = logging.getLogger("storymem.serve")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
RETENTION_KINDS = ("shots", "sessions", "jobs")


def duration_s(text: str) -> float:
    """'90', '90s', '15m', '12h', '7d' -> seconds (ArgumentTypeError otherwise)."""
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive duration (e.g. 90, 90s, 15m, 12h, 7d)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _ttl_override(text: str) -> tuple[str, float]:
    kind, sep, value = text.partition("=")
    if not sep or kind.strip() not in RETENTION_KINDS:
        raise argparse.ArgumentTypeError(
            f"expected KIND=DURATION with KIND one of {', '.join(RETENTION_KINDS)}, got {text!r}")
    return kind.strip(), duration_s(value)


def _limit_override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"limit {name}: {value!r} is not a number") from None
    return name.strip(), int(number) if number.is_integer() else number


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    from pipelines.serve.limits import ServeLimits
    from pipelines.serve.retention import RetentionPolicy

    limit_names = ", ".join(f"{k}={v}" for k, v in ServeLimits().to_dict().items())
    retention = RetentionPolicy()
    parser = subparsers.add_parser(
        "serve", help="run the HTTP endpoint (Ray Serve): shots, sessions, story jobs",
        description="Start the storymem HTTP API on Ray Serve: POST /v1/shots (one shot), "
        "/v1/sessions (build a story shot by shot), /v1/stories (asynchronous story jobs), "
        "GET /healthz; OpenAPI schema at /openapi.json, docs at /docs. Every /v1 call needs "
        "`Authorization: Bearer <key>`; keys come from STORYMEM_API_KEYS (comma-separated) "
        "and/or --api-key-file (one per line). The model flags are those of `storymem "
        "render`, so a story job renders exactly what `render` would. See docs/serve.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    net = parser.add_argument_group("HTTP")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on")
    net.add_argument("--port", type=int, default=8000, help="port to listen on")
    net.add_argument("--request-timeout-s", type=float, default=900.0,
                     help="Serve's end-to-end timeout per HTTP request (story jobs are "
                          "asynchronous and not bound by it)")
    net.add_argument("--api-key-file", metavar="FILE",
                     help="file with one API key per line (# comments allowed); adds to "
                          "STORYMEM_API_KEYS")
    net.add_argument("--storage", default="./serve-data", metavar="URI",
                     help="where shots, sessions and story jobs are stored (local folder "
                          "or s3://bucket/prefix)")
    net.add_argument("--image-uri-prefix", action="append", default=[], metavar="PREFIX",
                     help="allow request images given as URIs under this prefix: same "
                          "scheme, same bucket, whole path segments (repeat for several); "
                          "without it only base64/data URIs are accepted")
    net.add_argument("--job-stale-after-s", type=float, default=60.0,
                     help="a story job's claim (and a session's shot lease) lapses this long "
                          "after its replica stopped renewing it; the job is then taken "
                          "over by another (or the restarted) replica and resumed")
    net.add_argument("--limit", action="append", default=[], type=_limit_override,
                     metavar="NAME=VALUE",
                     help=f"override a request limit or per-key quota; defaults: {limit_names}")
    jobs = parser.add_argument_group("story jobs and retention")
    jobs.add_argument("--job-workers", type=int, default=1,
                      help="story jobs rendering at once per generation replica (jobs have "
                           "their own threads; at most max_queued_jobs more wait)")
    jobs.add_argument("--max-job-attempts", type=int, default=3,
                      help="times a story job is started (its replica died each time) "
                           "before it fails with that reason")
    jobs.add_argument("--ttl", action="append", default=[], type=_ttl_override,
                      metavar="KIND=DURATION",
                      help="how long stored items are kept, per kind (shots, sessions: since "
                           "their last change; jobs: since they finished), e.g. shots=2d; "
                           f"defaults: shots={retention.shots_ttl_s:g}s, "
                           f"sessions={retention.sessions_ttl_s:g}s, jobs={retention.jobs_ttl_s:g}s")
    jobs.add_argument("--cleanup-every", type=duration_s, default=retention.cleanup_every_s,
                      metavar="DURATION",
                      help="how often the retention sweep runs (seconds, or 15m, 1h ...)")
    scale = parser.add_argument_group("replicas")
    scale.add_argument("--replicas", type=int, default=1,
                       help="generation replicas (each loads the model once)")
    scale.add_argument("--gpus-per-replica", type=float, default=None,
                       help="GPUs per generation replica, fractional allowed (default: 1 "
                            "when Ray sees a GPU, else 0)")
    scale.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="CPUs reserved per generation replica")
    scale.add_argument("--scorer-replicas", type=int, default=1,
                       help="replicas of each shared scorer deployment (CLIP, gate)")
    scale.add_argument("--scorer-gpus", type=float, default=0.0,
                       help="GPUs per scorer replica, fractional allowed (the scorers run "
                            "on cuda when > 0, else on the CPU)")
    scale.add_argument("--scorer-cpus", type=float, default=0.1,
                       help="CPUs reserved per scorer replica")
    scale.add_argument("--torch-threads", type=int, default=None,
                       help="torch CPU threads per replica (default: torch's choice)")
    scale.add_argument("--ray-address", default=None,
                       help="existing Ray cluster (default: start a local one on 127.0.0.1)")
    add_model_arguments(parser)
    parser.set_defaults(func=run_serve)
    return parser


def check_serve_flags(args: argparse.Namespace) -> None:
    """ArgumentsError naming a flag that cannot work on a server (before anything is
    resolved); every setting's own bounds are `ServeSettings.problems`."""
    if args.references:
        raise ArgumentsError("--references is not a server setting: send reference_images "
                             "with POST /v1/sessions")
    if not 0 < args.port < 65536:
        raise ArgumentsError(f"--port {args.port} is not a TCP port")


def default_gpus_per_replica(args: argparse.Namespace, gpus_available: float) -> float:
    """`--gpus-per-replica`, else one GPU per replica when Ray sees one, else none."""
    if args.gpus_per_replica is not None:
        return args.gpus_per_replica
    return 1.0 if gpus_available >= 1 else 0.0


def serve_render_spec(args: argparse.Namespace, gpus_per_replica: float):
    """The RenderSpec `storymem render` builds from the model flags, for generation
    replicas with `gpus_per_replica` GPUs; the scorers run where --scorer-gpus says."""
    render = render_spec_from_args(args, accelerator=gpus_per_replica > 0)
    if render.scorers is not None:
        render = render.replace(scorers=render.scorers.replace(
            device="cuda" if args.scorer_gpus > 0 else "cpu"))
    return render


def settings_from_args(args: argparse.Namespace, gpus_available: float = 0.0):
    """The `ServeSettings` for these flags; ArgumentsError / ApiKeyConfigError (both
    ValueErrors) naming the problem (a setting out of bounds: `ServeSettings.problems`).
    `gpus_available`: GPUs Ray sees (for the default --gpus-per-replica)."""
    from pipelines.serve.auth import load_key_digests
    from pipelines.serve.limits import ServeLimits
    from pipelines.serve.retention import RetentionPolicy
    from pipelines.serve.settings import ServeSettings
    from storymem_model.spec_json import SpecError

    check_serve_flags(args)
    key_digests = load_key_digests(args.api_key_file)
    try:
        limits = ServeLimits.from_overrides(dict(args.limit))
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None
    gpus = default_gpus_per_replica(args, gpus_available)
    render = serve_render_spec(args, gpus)
    storage_root = args.storage
    if "://" not in storage_root:  # replicas do not share the driver's working directory
        storage_root = os.path.abspath(storage_root)
    try:
        retention = RetentionPolicy(
            cleanup_every_s=args.cleanup_every,
            **{f"{kind}_ttl_s": seconds for kind, seconds in args.ttl})
        return ServeSettings(
            render=render, storage_root=storage_root, key_digests=tuple(key_digests),
            limits=limits, image_uri_prefixes=tuple(args.image_uri_prefix),
            replicas=args.replicas, gpus_per_replica=gpus,
            cpus_per_replica=args.cpus_per_replica, scorer_replicas=args.scorer_replicas,
            scorer_gpus=args.scorer_gpus, scorer_cpus=args.scorer_cpus,
            job_stale_after_s=args.job_stale_after_s, torch_threads=args.torch_threads,
            job_workers=args.job_workers, max_job_attempts=args.max_job_attempts,
            retention=retention)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None


def start_serve(args: argparse.Namespace) -> str:
    """Start (or update) the `storymem` Serve application; returns its base URL.

    Uses the Ray cluster already initialised in this process, else `--ray-address`, else a
    new local one. Raises ValueError (ArgumentsError, ApiKeyConfigError) for bad flags
    before Ray starts.
    """
    import ray
    from ray import serve

    from pipelines.serve.app import build_app
    from pipelines.serve.proxy_guard import proxy_env
    from pipelines.serve.settings import APP_NAME

    settings = settings_from_args(args)  # fail fast, before Ray starts
    if not ray.is_initialized():
        if args.ray_address:
            ray.init(address=args.ray_address)
        else:
            ray.init(include_dashboard=False)
    gpus = default_gpus_per_replica(args, ray.cluster_resources().get("GPU", 0.0))
    if gpus != settings.gpus_per_replica:  # the default: a GPU per replica Ray can give
        # Only the render spec depends on it (the model's device and dtype).
        settings = settings.replace(gpus_per_replica=gpus,
                                    render=serve_render_spec(args, gpus))
    # Serve's proxies inherit the controller's environment: it makes them run the request
    # guard before they buffer a body (pipelines/serve/proxy_guard.py).
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": args.request_timeout_s},
                controller_options={"runtime_env": {"env_vars": proxy_env(settings)}})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    if not proxy_guarded(url):
        log.warning("Serve's HTTP proxy runs without the storymem request guard (Serve was "
                    "already running when this server started, so its proxy kept its old "
                    "settings): unauthenticated and oversized bodies are buffered by the "
                    "proxy before the ingress refuses them. Run `serve shutdown` (or restart "
                    "the cluster) and start `storymem serve` again.")
    return url


def proxy_guarded(url: str, timeout_s: float = 10.0) -> bool:
    """Whether the proxy at `url` answers an unauthenticated /v1 request itself (the guard
    marks its answers), i.e. refuses such requests before reading their bodies."""
    import urllib.error
    import urllib.request

    from pipelines.serve.proxy_guard import GUARD_HEADER

    request = urllib.request.Request(url + "/v1/stories", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            headers = response.headers
    except urllib.error.HTTPError as exc:
        headers = exc.headers
    except OSError:
        return False
    return headers.get(GUARD_HEADER.decode()) == "proxy"


def run_serve(args: argparse.Namespace) -> int:
    from ray import serve

    setup_cli_logging()
    try:
        url = start_serve(args)
    except ValueError as exc:  # ArgumentsError, ApiKeyConfigError
        print(f"storymem serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"storymem serve: listening on {url} (docs at {url}/docs, health at "
          f"{url}/healthz); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0
