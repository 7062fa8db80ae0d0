"""`storymem serve`: the HTTP endpoint (Ray Serve) with the model flags of `render`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from storymem_model.cli_render import add_model_arguments

log = logging.getLogger("storymem.serve")

APP_NAME = "storymem"


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
    from pipelines.serve_limits import ServeLimits

    limit_names = ", ".join(f"{k}={v}" for k, v in ServeLimits().as_dict().items())
    parser = subparsers.add_parser(
        "serve", help="run the HTTP endpoint (Ray Serve): shots, sessions, story jobs",
        description="Start the storymem HTTP API on Ray Serve: POST /v1/shots (one shot), "
        "/v1/sessions (build a story shot by shot), /v1/stories (asynchronous story jobs), "
        "GET /healthz; OpenAPI schema at /openapi.json, docs at /docs. Every /v1 call needs "
        "`Authorization: Bearer <key>`; keys come from STORYMEM_API_KEYS (comma-separated) "
        "and/or --api-key-file (one per line). The model flags are those of `storymem "
        "render`, so a story job renders exactly what `render` would.",
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
                       help="GPUs per scorer replica, fractional allowed")
    scale.add_argument("--scorer-cpus", type=float, default=0.1,
                       help="CPUs reserved per scorer replica")
    scale.add_argument("--torch-threads", type=int, default=None,
                       help="torch CPU threads per replica (default: torch's choice)")
    scale.add_argument("--ray-address", default=None,
                       help="existing Ray cluster (default: start a local one on 127.0.0.1)")
    add_model_arguments(parser)
    parser.set_defaults(func=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace, gpus_available: float = 0.0):
    """ServeSettings from parsed flags; raises ValueError / ApiKeyConfigError naming the problem."""
    from pipelines.serve_app import ServeSettings
    from pipelines.serve_auth import load_key_digests
    from pipelines.serve_limits import ServeLimits
    from pipelines.serve_model_factory import ModelFactory

    if not args.preset and not args.model_dir:
        raise ValueError("give --preset tiny or --model-dir DIR (see --help)")
    if getattr(args, "references", None):
        raise ValueError("--references is not a server setting: send reference_images with "
                         "POST /v1/sessions")
    if args.replicas < 1 or args.scorer_replicas < 1:
        raise ValueError("--replicas and --scorer-replicas must be at least 1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port")
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if gpus_available >= 1 else 0.0
    if args.job_stale_after_s < 2:
        raise ValueError("--job-stale-after-s must be at least 2 seconds")
    if gpus < 0 or args.cpus_per_replica < 0:
        raise ValueError("--gpus-per-replica and --cpus-per-replica must be >= 0")
    ModelFactory(args).check_flags()  # seconds, before replicas spend minutes loading
    limits = ServeLimits.from_overrides(dict(args.limit))
    storage_root = args.storage
    if "://" not in storage_root:  # replicas do not share the driver's working directory
        storage_root = os.path.abspath(storage_root)
    return ServeSettings(
        storage_root=storage_root, key_digests=tuple(load_key_digests(args.api_key_file)),
        limits=limits, image_uri_prefixes=tuple(args.image_uri_prefix),
        replicas=args.replicas, gpus_per_replica=gpus, cpus_per_replica=args.cpus_per_replica,
        scorer_replicas=args.scorer_replicas, scorer_gpus=args.scorer_gpus,
        scorer_cpus=args.scorer_cpus, job_stale_after_s=args.job_stale_after_s,
        torch_threads=args.torch_threads)


def start_serve(args: argparse.Namespace) -> str:
    """Start (or update) the `storymem` Serve application; returns its base URL.

    Uses the Ray cluster already initialised in this process, else `--ray-address`, else a
    new local one. Raises ValueError / ApiKeyConfigError for bad flags before Ray starts.
    """
    import ray
    from ray import serve

    from pipelines.serve_app import build_app

    settings_from_args(args)  # fail fast, before Ray starts
    if not ray.is_initialized():
        if args.ray_address:
            ray.init(address=args.ray_address)
        else:
            ray.init(include_dashboard=False)
    settings = settings_from_args(args, ray.cluster_resources().get("GPU", 0.0))
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": args.request_timeout_s})
    serve.run(build_app(settings, args), name=APP_NAME, route_prefix="/")
    return f"http://{args.host}:{args.port}"


def run_serve(args: argparse.Namespace) -> int:
    from ray import serve

    from pipelines.serve_auth import ApiKeyConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        url = start_serve(args)
    except (ValueError, ApiKeyConfigError) as exc:
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
