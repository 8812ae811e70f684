"""The sweep's driver: validation, submission, the seed-band monitor and its actions, progress, the watchdog, and what happens when the driver itself dies."""
