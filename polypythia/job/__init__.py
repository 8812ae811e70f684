"""One training job inside a Ray worker: its MLflow run, its threads, its rewind log, and the run itself."""
