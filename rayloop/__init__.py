"""The composition root: the `rayloop` command line and the retrain Ray Job's entry point."""
