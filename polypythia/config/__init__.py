"""A job's configuration: the typed schema and its defaults, the job config with its checks, and preflight checks against the world."""
