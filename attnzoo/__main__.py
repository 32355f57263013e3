"""``python -m attnzoo``: the ``attnzoo`` command (:mod:`attnzoo_cli`).

``python -m`` imports the package first (torch, timm, the zoo), so this form is slower
to start than the ``attnzoo`` script or ``python -m attnzoo_cli``, which read the spec
files only for ``--help``, ``list`` and ``blocks``.
"""

import sys

from attnzoo_cli import main

if __name__ == "__main__":
    sys.exit(main())
