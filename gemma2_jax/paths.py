"""Workdir and data paths, local or in a bucket (gs://, s3://), as `etils.epath` paths.

Orbax and grain read and write through epath; everything of ours that joins, lists, opens or checks
such a path goes through it too. `pathlib.Path("gs://b/run")` would silently be a local directory
named `gs:`.
"""

from __future__ import annotations

import glob as glob_lib
import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path; a local one is made absolute (Orbax and TensorStore need absolute local paths,
  while `epath.Path("gs://b/x").absolute()` would turn a bucket path into a local one)."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob, local or remote. A remote one lists from the last directory before
  the first wildcard (`**` is refused by epath on buckets: one listing RPC per directory)."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))
  parts = pattern.split("/")
  k = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
  root, rest = "/".join(parts[:k]), "/".join(parts[k:])
  if not rest:
    return [pattern] if epath.Path(pattern).exists() else []
  return sorted(str(p) for p in epath.Path(root).glob(rest))
