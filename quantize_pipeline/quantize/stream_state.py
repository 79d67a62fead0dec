"""Layer-level resume for streaming quantization.

After each decoder layer, its exported tensors and the calibration hidden states at the boundary
(its float outputs = the next layer's inputs) are saved, with their sha256, in a folder of the run
that resume does not delete (a plain name: `remove_stale_temps` only removes temp names). A killed
run restarts after the last layer whose files still verify, with the same inputs, so the export
is byte-identical. A different recipe/model/calibration (the key) starts the folder afresh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from quantize_pipeline.run.rundir import atomic_save_tensors, atomic_write_json, read_json, sha256_file

KEY_FILE = "key.json"


def state_key(recipe_sections: dict, model_dir: Path, forward_passes: list[list[list[int]]], device: str) -> str:
    """What a layer's outputs depend on: the recipe's model/calibration/quantization, the model, the tokens and
    how they are grouped into forward passes (a saved boundary holds one tensor a pass)."""
    data = {"recipe": recipe_sections, "model_dir": str(model_dir), "device": device,
            "tokens": hashlib.sha256(json.dumps(forward_passes).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class LayerState:
    def __init__(self, folder: Path, key: str):
        self.folder = folder
        saved = read_json(folder / KEY_FILE) if (folder / KEY_FILE).is_file() else {}
        if folder.is_dir() and saved.get("key") != key:
            shutil.rmtree(folder)  # another recipe, model or calibration: nothing here is valid for this run
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / KEY_FILE).is_file():
            atomic_write_json(folder / KEY_FILE, {"key": key})

    def _paths(self, index: int) -> tuple[Path, Path, Path]:
        stem = self.folder / f"layer-{index:05d}"
        return stem.with_suffix(".json"), Path(f"{stem}.safetensors"), Path(f"{stem}.hidden.safetensors")

    def finished_layers(self, count: int, needs_hidden: bool) -> int:
        """How many leading layers are saved and verify (tensors, and the boundary hidden states of the last)."""
        finished = 0
        for index in range(count):
            record_path, tensors_path, _ = self._paths(index)
            if not record_path.is_file() or not tensors_path.is_file():
                break
            if sha256_file(tensors_path) != read_json(record_path)["tensors_sha256"]:
                break
            finished = index + 1
        while finished and needs_hidden:  # the boundary of the last finished layer must verify too
            record_path, _, hidden_path = self._paths(finished - 1)
            expected = read_json(record_path).get("hidden_sha256")
            if hidden_path.is_file() and sha256_file(hidden_path) == expected:
                break
            finished -= 1
        return finished

    def save(self, index: int, tensors: dict, hidden: list | None, frozen_quantizers: int = 0,
             uncalibrated_experts: list | None = None) -> None:
        # Written from the tensors' own memory (issue #26: `save` to bytes first held a second copy of a boundary
        # that can be the largest thing a streaming run holds, e.g. 16 GiB for the 70B recipe's calibration).
        record_path, tensors_path, hidden_path = self._paths(index)
        atomic_save_tensors(tensors_path, {name: tensor.to("cpu").contiguous() for name, tensor in tensors.items()})
        record = {"tensors_sha256": sha256_file(tensors_path), "frozen_quantizers": frozen_quantizers,
                  "uncalibrated_experts": uncalibrated_experts or []}
        if hidden is not None:
            atomic_save_tensors(hidden_path, {str(batch): state.to("cpu").contiguous() for batch, state in enumerate(hidden)})
            record["hidden_sha256"] = sha256_file(hidden_path)
        atomic_write_json(record_path, record)
        if index:  # only the newest boundary is ever read back
            self._paths(index - 1)[2].unlink(missing_ok=True)

    def frozen_quantizers(self, index: int) -> int:
        return read_json(self._paths(index)[0]).get("frozen_quantizers", 0)

    def uncalibrated_experts(self, index: int) -> list:
        """The layer's MoE experts no calibration token reached (moe.fill_uncalibrated_expert_scales)."""
        return read_json(self._paths(index)[0]).get("uncalibrated_experts", [])

    def load_tensors(self, index: int) -> dict:
        from safetensors.torch import load_file

        return load_file(self._paths(index)[1])

    def load_hidden(self, index: int, device: str) -> list:
        from safetensors.torch import load_file

        states = load_file(self._paths(index)[2], device=device)
        return [states[str(batch)] for batch in range(len(states))]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
