"""Where the repository's folders are, for tests that read or run what lies outside the
package (tools/, weights/, docs/)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
WEIGHTS = REPO / "weights"
