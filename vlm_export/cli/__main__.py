"""`python -m vlm_export.cli`: the same as the `vlm-export` console script."""

from vlm_export.cli.app import main

main()
