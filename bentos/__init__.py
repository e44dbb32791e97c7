"""BentoML services of driftloop (the only place besides the CLI that imports bentoml)."""
