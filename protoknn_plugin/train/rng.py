"""Seeding and RNG states as plain data (tensors, ints, lists), so checkpoints load with
``torch.load(weights_only=True)``: numpy's state arrays become int64 tensors."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    from pytorch_metric_learning.utils import common_functions as c_f

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # MPerClassSampler draws from PML's own numpy RandomState, not from torch.
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)


def _numpy_state_plain(state) -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_tuple(plain: Dict[str, Any]):
    return (plain["name"], plain["keys"].numpy().astype(np.uint32), plain["pos"], plain["has_gauss"],
            plain["cached_gaussian"])


def rng_state() -> Dict[str, Any]:
    from pytorch_metric_learning.utils import common_functions as c_f

    version, internal, gauss = random.getstate()
    state = {"python": {"version": int(version), "state": list(internal), "gauss": gauss},
             "numpy": _numpy_state_plain(np.random.get_state()), "torch": torch.get_rng_state(),
             "pml": _numpy_state_plain(c_f.NUMPY_RANDOM.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from pytorch_metric_learning.utils import common_functions as c_f

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(_numpy_state_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    c_f.NUMPY_RANDOM.set_state(_numpy_state_tuple(state["pml"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
