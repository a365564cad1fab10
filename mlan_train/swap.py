"""Crash-safe replacement of a checkpoint directory.

A new checkpoint is written to `D.tmp`; the file COMPLETE is written into it last. Then
    D -> D.old,   D.tmp -> D,   delete D.old
(each a rename or a delete). Deleting a directory removes its COMPLETE first, so a directory
holding COMPLETE always holds a whole checkpoint. At every point between two of these
filesystem operations, the newest complete checkpoint is, in this order of preference,
    D.tmp (when it holds COMPLETE: it was written after D),  D,  D.old (when complete)
and `find_checkpoint` returns it. `recover` finishes an interrupted swap; a save calls it
first, so no save deletes the newest complete checkpoint before its successor is complete.
Guarantees are for a process that stops at any point (crash, kill); files are not fsynced,
so a power loss may still lose the last writes.
"""
import os
import shutil
from typing import Optional

COMPLETE = "COMPLETE"


def staging_path(directory) -> str:
    return os.path.normpath(directory) + ".tmp"


def old_path(directory) -> str:
    return os.path.normpath(directory) + ".old"


def is_complete(path) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def _usable_main(directory) -> bool:
    """D only ever appears by renaming a complete directory; one without COMPLETE was written
    by an older version of this program (kept usable when it holds its trainer state)."""
    return os.path.isdir(directory) and (
        is_complete(directory) or os.path.isfile(os.path.join(directory, "trainer_state.pt")))


def find_checkpoint(directory) -> Optional[str]:
    """The newest complete checkpoint among D.tmp, D and D.old, or None."""
    directory = os.path.normpath(directory)
    if is_complete(staging_path(directory)):
        return staging_path(directory)
    if _usable_main(directory):
        return directory
    if is_complete(old_path(directory)):
        return old_path(directory)
    return None


def discard(path):
    """Delete a checkpoint directory, COMPLETE first (a partial delete is never 'complete')."""
    if not os.path.lexists(path):
        return
    marker = os.path.join(path, COMPLETE)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(path)


def mark_complete(path, step: int):
    with open(os.path.join(path, COMPLETE), "w", encoding="utf-8") as handle:
        handle.write(f"step {step}\n")


def recover(directory):
    """Finish whatever swap of `directory` was interrupted; afterwards D.tmp does not exist,
    and D.old exists only if D does not (then it is incomplete or absent)."""
    directory = os.path.normpath(directory)
    staging, old = staging_path(directory), old_path(directory)
    if is_complete(staging):
        swap_in(directory)
        return
    discard(staging)                       # a partial write: never the newest complete one
    if os.path.isdir(directory):
        discard(old)
    elif is_complete(old):
        os.replace(old, directory)


def swap_in(directory):
    """Replace D by the complete D.tmp: D -> D.old, D.tmp -> D, delete D.old."""
    staging, old = staging_path(directory), old_path(directory)
    if os.path.isdir(directory):
        discard(old)                       # older than D, which stays until D.tmp is in place
        os.replace(directory, old)
    os.replace(staging, directory)
    discard(old)
