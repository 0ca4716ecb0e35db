"""Runners start a trainer for a prepared workspace: `process` (subprocess, local mode) and `docker`."""
