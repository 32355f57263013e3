"""Whole networks whose attention is part of the architecture, registered as
``source: attnzoo`` backbones. Importing this package registers them all."""

from __future__ import annotations

from . import bisenet, danet, pan, ras, resattnet, stdc, tiny  # noqa: F401  (registration)
