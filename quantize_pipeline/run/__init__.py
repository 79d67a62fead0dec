"""Run machinery: the runner that drives the stages, the stage record, isolated child processes, the crash-safe run folder,
manifests, resume, progress events."""
