"""MLflow: the client and buffered logger, the local server and its stores, and the links and tags the UI reads."""
