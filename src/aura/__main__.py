"""``python -m aura`` is the ``aura`` command."""

from aura.cli import main

main()
