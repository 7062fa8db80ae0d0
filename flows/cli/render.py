"""`storymem render SCRIPT... --out URI`: render story scripts in this process.

Every flag becomes a resolved `RenderSpec` first (`model_flags.render_spec_from_args`:
model folders, LoRA and scorer files are read for their content ids, reference images for
their pixel hashes, every setting is checked), so unusable flags fail in seconds with
exit status 2, before any weights load. The config hash is then known, so stories whose
folder is already committed are reported as skipped without loading the model; the model
and scorers load (`runner.open_runner`) only for the first story with work left.

The command holds the output lock (`OUT/_locks/render.json`, `storymem_model.output_lock`)
while it renders, the same lock `storymem batch` takes: a second writer of the same output
exits with status 2 at once, naming the holder (or waits `--wait-lock` seconds). If the
lease is lost (another run took it over after this one stalled past `--lock-ttl`), the
render stops before its next shot (every finished shot is checkpointed) with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from flows.cli.cli_logging import setup_cli_logging
from flows.cli.lock_flags import add_lock_arguments, sigterm_exits
from flows.cli.model_flags import (ArgumentsError, accelerator_from_args, add_model_arguments,
                                   render_spec_from_args)

log = logging.getLogger("storymem.render")

PROGRESS_CHOICES = ("auto", "bar", "log", "none")


def add_render_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "render", help="render story scripts into multi-shot videos",
        description="Render story scripts (ST-Bench JSON/JSON5 or a JSON list of prompts) "
        "shot by shot with StoryMem memory. Each story's files go to "
        "OUT/{story_id}/{config_hash}/: shots/*.mp4, keyframes/, memory/, {story_id}.mp4, "
        "shots.parquet and _COMMITTED.json (written last). Running the same command again "
        "skips committed stories and resumes interrupted ones from their first unfinished "
        "shot. Flags are checked before any model loads. The command holds the output "
        "lock OUT/_locks/render.json while it renders (the lock `storymem batch` takes): "
        "a second writer of OUT exits at once naming the holder, unless --wait-lock. Exit "
        "status 1 when any story fails (the others still render), 2 for bad flags, an "
        "output locked by another run or a lost lock. `storymem plan` shows what a render "
        "would do without loading anything.")
    parser.add_argument("scripts", nargs="+", metavar="SCRIPT",
                        help="story script files (local paths or s3:// URIs)")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output folder or fsspec URI (e.g. ./outputs, s3://bucket/prefix)")
    parser.add_argument("--progress", choices=PROGRESS_CHOICES, default="auto",
                        help="progress bars on a terminal and log lines otherwise (auto, "
                             "the default), always bars, log lines, or nothing")
    add_lock_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(func=run_render)
    return parser


def run_render(args: argparse.Namespace) -> int:
    from storymem_model import storage
    from storymem_model.story_script import ScriptError, load_script

    setup_cli_logging()
    try:  # seconds, before minutes of model loading
        storage.filesystem(args.out)
        spec = render_spec_from_args(args, accelerator=accelerator_from_args(args))
    except (ArgumentsError, storage.StorageError) as exc:
        return _unusable(exc)
    # Every script is validated before any model work; bad scripts are reported, not fatal.
    failures: list[tuple[str, str]] = []
    scripts = []
    for uri in args.scripts:
        try:
            scripts.append(load_script(uri))
        except ScriptError as exc:
            failures.append((uri, str(exc)))
            log.error("%s", exc)
        except Exception as exc:  # noqa: BLE001 - one unreadable script never stops the rest
            message = f"story script {uri} cannot be read: {type(exc).__name__}: {exc}"
            failures.append((uri, message))
            log.error("%s", message)
    results: list = []
    if scripts:
        with sigterm_exits():
            code = _render_locked(args, spec, scripts, results, failures)
        if code is not None:
            return code
    _print_summary(results, failures)
    return 1 if failures else 0


def _render_locked(args, spec, scripts, results: list, failures: list) -> int | None:
    """Render `scripts` holding the output lock; an exit status when the run must stop
    (output locked, lock lost, model unusable), else None."""
    from tqdm.auto import tqdm

    from storymem_model.output_lock import OutputLock, OutputLockedError, default_owner
    from storymem_model import output_layout, storage
    from storymem_model.runner import RenderError

    lock = OutputLock(args.out, "render", owner=f"storymem render ({default_owner()})",
                      ttl_s=args.lock_ttl, wait_s=args.wait_lock)
    try:
        lock.acquire()
    except (OutputLockedError, ValueError, storage.StorageError) as exc:
        return _unusable(exc)
    try:
        runner = _Runner(spec)
        progress = _ShotProgress(args.progress, lock)
        use_bar = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
        for script in tqdm(scripts, unit="story", desc="stories", disable=not use_bar):
            try:
                progress.check_lock()
                result = runner.render(script, args.out, progress)
            except _ModelUnusable as exc:
                return _unusable(exc)
            except _LockLost as exc:
                _print_summary(results, failures)
                return _unusable(exc)
            except (RenderError, storage.StorageError) as exc:  # expected: no traceback
                log.error("story %s (%s) failed: %s", script.story_id, script.source, exc)
                failures.append((script.source, f"{type(exc).__name__}: {exc}"))
                continue
            except Exception as exc:  # one story failing never stops the others
                log.exception("story %s (%s) failed", script.story_id, script.source)
                failures.append((script.source, f"{type(exc).__name__}: {exc}"))
                continue
            finally:
                progress.close()
                # we hold the lock: temporary files of a killed earlier render are leftovers
                storage.remove_unfinished_writes(output_layout.story_uri(
                    args.out, script.story_id, spec.config_hash))
            results.append(result)
            log.info("story %s %s: %s and %s", script.story_id, result.status,
                     result.video_uri, result.parquet_uri)
    finally:
        lock.release()
    return None


class _LockLost(RuntimeError):
    """The output lock was taken over by another run: stop before the next shot."""


class _ShotProgress:
    """The per-shot callback the runner calls after each checkpointed shot: checks that
    the output lock is still held (else stops the render before its next shot) and shows
    progress as --progress says (a bar per story, log lines, or nothing)."""

    def __init__(self, mode: str, lock):
        self.lock = lock
        self.bars = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.lines = mode == "log" or (mode == "auto" and not self.bars)
        self.bar = None

    def check_lock(self) -> None:
        if self.lock.lost:
            raise _LockLost(f"the output lock {self.lock.uri} was lost (another run took "
                            f"it over); stopped before the next shot, every finished shot "
                            f"is checkpointed and resumes with the next render")

    def __call__(self, event) -> None:
        from storymem_model.runner import describe_shot_done

        if self.bars:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=event.shots_total, initial=event.shot_index,
                                unit="shot", desc=event.story_id[:40], leave=False)
            self.bar.update(1)
        elif self.lines:
            log.info("%s", describe_shot_done(event))
        self.check_lock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _unusable(exc: Exception) -> int:
    print(f"storymem render: error: {exc}", file=sys.stderr)
    return 2


class _ModelUnusable(ValueError):
    """The model or scorers the spec names failed to load (exit status 2)."""


class _Runner:
    """The story runner, opened for the first story that has work left: a committed
    story is known from the config hash alone, so a run with nothing to do loads nothing."""

    def __init__(self, spec):
        self.spec = spec
        self.runner = None

    def render(self, script, out: str, progress):
        from storymem_model import output_layout, storage

        story_uri = output_layout.story_uri(out, script.story_id, self.spec.config_hash)
        if storage.is_committed(story_uri):
            return self._skipped(script, story_uri)
        return self._open().render(script, out, progress=progress)

    def _open(self):
        from storymem_model import storage
        from storymem_model.runner import RenderError, open_runner

        if self.runner is None:
            started = time.perf_counter()
            try:
                self.runner = open_runner(self.spec)
            except (ValueError, RenderError, storage.StorageError) as exc:
                raise _ModelUnusable(str(exc)) from exc  # model, LoRA or scorer files
            log.info("model %s ready in %.1f s; config %s", self.spec.config.model_id,
                     time.perf_counter() - started, self.spec.config_hash)
        return self.runner

    def _skipped(self, script, story_uri: str):
        from storymem_model import output_layout, storage
        from storymem_model.runner import StoryResult

        log.info("story %s: already committed at %s, skipped", script.story_id, story_uri)
        return StoryResult(
            script.story_id, self.spec.config_hash, story_uri, "skipped",
            len(script.shots), 0,
            storage.join(story_uri, output_layout.story_video_key(script.story_id)),
            storage.join(story_uri, output_layout.SHOTS_PARQUET), 0.0)


def _print_summary(results, failures) -> None:
    out = sys.stdout
    for result in results:
        print(f"{result.status:9s} {result.story_id}: {result.shots_total} shots "
              f"({result.shots_rendered} rendered now) in {result.seconds:.1f} s", file=out)
        print(f"          video   {result.video_uri}", file=out)
        print(f"          parquet {result.parquet_uri}", file=out)
    if failures:
        print(f"{len(failures)} of {len(results) + len(failures)} stories FAILED:", file=out)
        for source, reason in failures:
            first = reason.splitlines()
            print(f"  {source}: {first[0]}", file=out)
            for line in first[1:]:
                print(f"    {line}", file=out)
    else:
        print(f"all {len(results)} stories done", file=out)
