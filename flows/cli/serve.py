"""`storymem serve`: the HTTP endpoint (Ray Serve) with the model flags of `render`.

The flags become one `ServeSettings` spec here, before Ray starts: the Serve flags are
checked, the API keys are read (only their digests are kept), and the model flags are
resolved into the `RenderSpec` `storymem render` would build from them
(`model_flags.render_spec_from_args`, with an accelerator when the generation replicas get
GPUs) - so a story job or a session renders with the same RenderConfig, hence the same
config hash and bytes, as `render` with the same flags. Every replica receives that spec.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from flows.cli.cli_logging import setup_cli_logging
from flows.cli.model_flags import ArgumentsError, add_model_arguments, render_spec_from_args


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

    limit_names = ", ".join(f"{k}={v}" for k, v in ServeLimits().to_dict().items())
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
                     help="allow request images given as URIs under this prefix (repeat "
                          "for several); without it only base64/data URIs are accepted")
    net.add_argument("--job-stale-after-s", type=float, default=60.0,
                     help="a story job whose replica has not reported for this long is "
                          "taken over by another (or the restarted) replica and resumed")
    net.add_argument("--limit", action="append", default=[], type=_limit_override,
                     metavar="NAME=VALUE", help=f"override a request limit; defaults: {limit_names}")
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
    """ArgumentsError naming a Serve flag that cannot work (before anything is resolved)."""
    if args.references:
        raise ArgumentsError("--references is not a server setting: send reference_images "
                             "with POST /v1/sessions")
    if args.replicas < 1 or args.scorer_replicas < 1:
        raise ArgumentsError("--replicas and --scorer-replicas must be at least 1")
    if not 0 < args.port < 65536:
        raise ArgumentsError(f"--port {args.port} is not a TCP port")
    if args.job_stale_after_s < 2:
        raise ArgumentsError("--job-stale-after-s must be at least 2 seconds")
    if (args.gpus_per_replica or 0) < 0 or args.cpus_per_replica < 0 \
            or args.scorer_gpus < 0 or args.scorer_cpus < 0:
        raise ArgumentsError("--gpus-per-replica, --cpus-per-replica, --scorer-gpus and "
                             "--scorer-cpus must be >= 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ArgumentsError("--torch-threads must be at least 1")


def settings_from_args(args: argparse.Namespace, gpus_available: float = 0.0):
    """The `ServeSettings` for these flags; ArgumentsError / ApiKeyConfigError (both
    ValueErrors) naming the problem. `gpus_available`: GPUs Ray sees (for the default
    --gpus-per-replica)."""
    from pipelines.serve.auth import load_key_digests
    from pipelines.serve.limits import ServeLimits
    from pipelines.serve.settings import ServeSettings
    from storymem_model.spec_json import SpecError

    check_serve_flags(args)
    key_digests = load_key_digests(args.api_key_file)
    try:
        limits = ServeLimits.from_overrides(dict(args.limit))
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if gpus_available >= 1 else 0.0
    render = render_spec_from_args(args, accelerator=gpus > 0)
    if render.scorers is not None:  # the scorer deployments run where --scorer-gpus says
        render = render.replace(scorers=render.scorers.replace(
            device="cuda" if args.scorer_gpus > 0 else "cpu"))
    storage_root = args.storage
    if "://" not in storage_root:  # replicas do not share the driver's working directory
        storage_root = os.path.abspath(storage_root)
    try:
        return ServeSettings(
            render=render, storage_root=storage_root, key_digests=tuple(key_digests),
            limits=limits, image_uri_prefixes=tuple(args.image_uri_prefix),
            replicas=args.replicas, gpus_per_replica=gpus,
            cpus_per_replica=args.cpus_per_replica, scorer_replicas=args.scorer_replicas,
            scorer_gpus=args.scorer_gpus, scorer_cpus=args.scorer_cpus,
            job_stale_after_s=args.job_stale_after_s, torch_threads=args.torch_threads)
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
    from pipelines.serve.settings import APP_NAME

    settings = settings_from_args(args)  # fail fast, before Ray starts
    if not ray.is_initialized():
        if args.ray_address:
            ray.init(address=args.ray_address)
        else:
            ray.init(include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if args.gpus_per_replica is None and gpus >= 1:  # the default: a GPU per replica
        settings = settings_from_args(args, gpus)
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": args.request_timeout_s})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://{args.host}:{args.port}"


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
