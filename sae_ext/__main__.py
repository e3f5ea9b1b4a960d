"""``python -m sae_ext`` is the ``sae-ext`` command."""

from sae_ext.cli import main

raise SystemExit(main())
