"""Running `storymem serve` in a test: a live app on 127.0.0.1 with the given flags and keys."""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_parser() -> argparse.ArgumentParser:
    from flows.cli.serve import add_serve_command

    parser = argparse.ArgumentParser(prog="storymem")
    add_serve_command(parser.add_subparsers(dest="command"))
    return parser


def wait_healthy(base: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base}/healthz did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def running_server(flags: list[str], keys: str):
    """`storymem serve FLAGS --host 127.0.0.1 --port <free>` on the test's Ray cluster with
    STORYMEM_API_KEYS=`keys`; yields the base URL, shuts Serve down after."""
    from ray import serve

    from flows.cli.serve import start_serve

    saved = os.environ.get("STORYMEM_API_KEYS")
    os.environ["STORYMEM_API_KEYS"] = keys
    args = serve_parser().parse_args(["serve", *flags, "--host", "127.0.0.1",
                                      "--port", str(free_port())])
    try:
        url = start_serve(args)
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
        if saved is None:
            os.environ.pop("STORYMEM_API_KEYS", None)
        else:
            os.environ["STORYMEM_API_KEYS"] = saved
