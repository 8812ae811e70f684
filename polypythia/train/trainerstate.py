"""A checkpoint's trainer state: what a resume needs beside DeepSpeed's state, as data only.

``trainer_state.json`` holds the step, the seeds, the last loss, what callbacks keep there
(:meth:`polypythia.train.callbacks.Callback.trainer_state`: the spike windows of the stability monitor
and of the skip-step action) and the Python and NumPy RNG states; ``trainer_state.safetensors`` the
torch (and CUDA) RNG states. Reading it runs no code: JSON and safetensors are data only, and a trainer
state left as a pickle by older versions (``trainer_state.pt``) is read with
``torch.load(weights_only=True)``. :mod:`polypythia.train.checkpoint` writes it into a checkpoint
(:func:`~polypythia.train.checkpoint.save_trainer_state`) and lists it in the manifest.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from polypythia.errors import CheckpointError

TRAINER_STATE = "trainer_state.json"
RNG_TENSORS = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"  # a pickle, written before the JSON format
TRAINER_STATE_FORMAT = 2


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_trainer_state(directory: Path, state: dict) -> None:
    from safetensors.torch import save_file

    rng = rng_state()
    save_file(
        {"torch": rng["torch"], **{f"cuda.{i}": t for i, t in enumerate(rng["cuda"])}}, str(directory / RNG_TENSORS)
    )
    version, internal, gauss_next = rng["python"]
    name, key, pos, has_gauss, cached_gaussian = rng["numpy"]
    document = {
        **state,
        "format": TRAINER_STATE_FORMAT,
        "rng": {
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "numpy": {
                "bit_generator": name,
                "key": key.tolist(),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "cuda_devices": len(rng["cuda"]),
        },
    }
    (directory / TRAINER_STATE).write_text(json.dumps(document))


def load_trainer_state(directory: Path) -> dict:
    """The trainer state of checkpoint ``directory``, RNG states included (as :func:`rng_state`
    returns them). Nothing in the files is executed: JSON and safetensors are data only, and an
    older checkpoint's pickled ``trainer_state.pt`` is read with ``weights_only=True``."""
    if (directory / TRAINER_STATE).is_file():
        return _load_json_state(directory)
    if (directory / LEGACY_TRAINER_STATE).is_file():
        return _load_legacy_state(directory / LEGACY_TRAINER_STATE)
    raise CheckpointError(f"Checkpoint {directory} has no {TRAINER_STATE}.")


def _load_json_state(directory: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        document = json.loads((directory / TRAINER_STATE).read_text())
        tensors = load_file(str(directory / RNG_TENSORS))
        rng = document.pop("rng")
        python, np_state = rng["python"], rng["numpy"]
        document["rng"] = {
            "python": (python["version"], tuple(python["state"]), python["gauss_next"]),
            "numpy": (
                np_state["bit_generator"],
                np.asarray(np_state["key"], dtype=np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            ),
            "torch": tensors["torch"],
            "cuda": [tensors[f"cuda.{i}"] for i in range(rng["cuda_devices"])],
        }
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"Checkpoint {directory} has an unreadable trainer state ({exc}).") from None
    return document


def _numpy_globals() -> list:
    """What a pickled NumPy array (the legacy NumPy RNG state) needs from NumPy to be rebuilt; see
    https://pytorch.org/docs/stable/notes/serialization.html#weights-only."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _load_legacy_state(path: Path) -> dict:
    """A ``trainer_state.pt`` written before the JSON format, read without running code."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"Checkpoint {path.parent} keeps its trainer state in {path.name}, a pickle that holds more than "
            "tensors and plain values and so is not loaded (loading it could run code from it); delete that "
            "checkpoint folder to resume from the one before it."
        ) from None
    except (RuntimeError, EOFError) as exc:  # not a torch file at all
        raise CheckpointError(
            f"Checkpoint {path.parent} has an unreadable trainer state ({path.name}: {exc})."
        ) from None
    if not isinstance(state, dict) or "step" not in state or "rng" not in state:
        raise CheckpointError(f"Checkpoint {path.parent} has an unreadable trainer state ({path.name}).")
    return state
