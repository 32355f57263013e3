"""A pickle payload that leaves a mark: proof that something was unpickled."""

from __future__ import annotations

import os
import pickle


class LeavesAMark:
    """Unpickling this creates the file ``path``: proof that something was unpickled."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(marker: str | os.PathLike[str]) -> bytes:
    """A pickled "state dict" that creates ``marker`` when unpickled."""
    return pickle.dumps({"state_dict": LeavesAMark(marker)})
