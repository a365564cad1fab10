"""Hostile files for the hardening tests: tensors that claim more elements than they store,
compressed or truncated torch files, and a peak-memory probe run in a fresh interpreter."""
import collections
import json
import os
import subprocess
import sys
import zipfile

import torch


class ClaimedTensor:
    """Pickles as torch's own tensor rebuild call over `storage` with any size and stride, as a
    hand-made file can (torch.save of a real tensor cannot write such a claim)."""

    def __init__(self, storage, size, stride, offset=0):
        self.arguments = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.arguments


def claimed_tensor(size, stride, stored=4):
    """A ClaimedTensor over a float32 storage of `stored` elements."""
    storage = torch.zeros(stored).untyped_storage()
    return ClaimedTensor(torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32,
                                                    _internal=True), size, stride)


def expanded_tensor(numel):
    """A 1-D tensor of `numel` elements, all read from one stored float (stride 0)."""
    return claimed_tensor((numel,), (0,), stored=1)


def recompress(path):
    """Rewrite the torch.save zip at `path` with every record deflated (same names and bytes)."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in records:
            archive.writestr(name, data)


def truncate(path, keep=0.5):
    """Cut the file at `path` to `keep` of its size."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))


PROBE = """
import json, resource, sys
import torch
sys.path[:0] = {paths}
{setup}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = "returned"
try:
{action}
except BaseException as error:
    outcome = type(error).__name__ + ": " + str(error).splitlines()[0]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"outcome": outcome, "grown_mb": (after - before) / 1024}}))
"""


def peak_memory_growth(setup, action, cwd):
    """Run `setup` then `action` (Python source, action indented by 4) in a fresh interpreter;
    -> {"outcome": "returned" | "ErrorType: first line", "grown_mb": peak RSS growth of the
    action in MiB}. A fresh process's peak is its import footprint, so any large allocation by
    the action shows."""
    code = PROBE.format(paths=[os.getcwd(), os.path.dirname(__file__)], setup=setup,
                        action="\n".join("    " + line for line in action.strip().splitlines()))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                            timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                [os.getcwd(), os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
