"""Leftovers of writes a killed process never finished, removed by the next writer.

A local write goes to `.{name}.{32 hex}.tmp` beside its target and is renamed into place
(`storage.write_bytes`); a process killed in between (SIGKILL, a lost node) leaves that
temporary file. Readers never see it (`storage.list_files` skips it, and commit markers
list only real files), but it must not stay: the writer that next owns the folder - it
holds the output lock - removes the leftovers of a story folder once the story's outcome
is known, and of a run folder when the run (or its continuation) opens it. S3 writes are
single PUTs: an object is whole or absent, so there is nothing to remove there.
"""
from __future__ import annotations

import logging
import os
import re

from storymem_model import storage

log = logging.getLogger("storymem.batch")

TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # storage.write_bytes' temporary files


def remove_unfinished_writes(folder_uri: str) -> list[str]:
    """Remove every temporary file of an unfinished local write under `folder_uri`;
    returns their paths ([] on object stores and for folders that do not exist)."""
    fs, root = storage.filesystem(folder_uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local") or not os.path.isdir(root):
        return []
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            if TEMP_NAME.fullmatch(name):
                path = os.path.join(folder, name)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
    if removed:
        log.warning("removed %d unfinished write(s) of a killed process under %s",
                    len(removed), folder_uri)
    return removed
