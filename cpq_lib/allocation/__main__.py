"""``python -m cpq_lib.allocation results.csv``: the Markdown comparison table of a sweep."""

from .report import main

raise SystemExit(main())
