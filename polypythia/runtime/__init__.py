"""Where the work runs: the Ray runtime (local or a cluster) and the process environment."""
