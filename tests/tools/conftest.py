"""The scripts in tools/ are not a package: their folder goes on sys.path, and the
tests import them as modules (``import bench``)."""

from __future__ import annotations

import sys

from tests._helpers.paths import TOOLS

sys.path.insert(0, str(TOOLS))
