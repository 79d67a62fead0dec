"""Run machinery: the runner that drives the stages, isolated child processes, the crash-safe run folder, manifests, resume, progress events."""
