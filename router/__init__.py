"""The router: AI Server's public API, a durable job queue, and agents that pull the jobs they fit."""
