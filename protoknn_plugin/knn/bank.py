"""The kNN memory bank: the stored training profiles, their labels and training indices.

The bank lives in registered buffers, so ``model.state_dict()`` saves it and ``load_state_dict``
restores it into an empty bank (the buffers are resized on load). Search structures derived from
the buffers (a device copy, a numpy view, a faiss index) are never saved: ``cached`` builds them
on first use and forgets them whenever the buffers change or move.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Hashable, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ProtoKNNError, UnknownNameError, check
from ..memory import MEMORY_SELECTORS, build_ivfpq, deserialize_index, serialize_index

MEMORY_KINDS = ("full", "condensed", "ivfpq")

# options each memory kind accepts (besides k, ks, num_classes, backend)
MEMORY_OPTIONS = {
    "full": (),
    "condensed": ("fraction", "per_class", "method", "seed", "niter", "batch"),
    "ivfpq": ("nlist", "m", "nbits", "nprobe", "seed"),
}
DEFAULT_NPROBE = 8

BUFFERS = ("memory_profiles", "memory_labels", "memory_index", "memory_codes")


class MemoryBank(nn.Module):
    """Stored training profiles of one memory kind (``full``, ``condensed`` or ``ivfpq``).

    Buffers (saved by ``state_dict``): ``memory_profiles`` (N, P) float32 (empty (0, P) for
    ivfpq, whose profiles exist only as PQ codes), ``memory_labels`` (N,) int64,
    ``memory_index`` (N,) int64 (the original training index of each kept item) and
    ``memory_codes`` (B,) uint8 (the serialised faiss IVF-PQ index; empty otherwise).
    """

    def __init__(self, memory: str = "full", num_classes: Optional[int] = None, **memory_options):
        super().__init__()
        check_memory(memory, memory_options)
        check(num_classes is None or (isinstance(num_classes, int) and num_classes >= 1),
              f"num_classes={num_classes!r} must be a positive int or None (inferred from the labels)")
        self.memory = memory
        self.memory_options = dict(memory_options)
        self.num_classes = num_classes
        self.fitted_num_classes: Optional[int] = None  # num_classes, or inferred at fit
        self.dim: Optional[int] = None  # P of the stored profiles
        self.register_buffer("memory_profiles", torch.empty(0, 0, dtype=torch.float32))
        self.register_buffer("memory_labels", torch.empty(0, dtype=torch.long))
        self.register_buffer("memory_index", torch.empty(0, dtype=torch.long))
        self.register_buffer("memory_codes", torch.empty(0, dtype=torch.uint8))
        self._invalidate()

    # ------------------------------------------------------------ building the memory
    @torch.no_grad()
    def fit(self, profiles: torch.Tensor, labels: torch.Tensor) -> "MemoryBank":
        """Store the memory bank from training ``profiles`` (N, P) and ``labels`` (N,)."""
        profiles = check_profiles(profiles, "fit")
        labels = self._check_labels(labels, profiles.shape[0])
        num_classes = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        device = self.memory_labels.device
        if self.memory == "ivfpq":
            options = {key: value for key, value in self.memory_options.items() if key != "nprobe"}
            index = build_ivfpq(profiles, **options)
            self._set_buffers(profiles=torch.empty(0, profiles.shape[1]),
                              labels=labels, index=torch.arange(len(labels)),
                              codes=serialize_index(index), device=device)
        else:
            kept = MEMORY_SELECTORS.create(self.memory, profiles=profiles, labels=labels,
                                           **self.memory_options)
            self._set_buffers(profiles=profiles[kept], labels=labels[kept], index=kept,
                              codes=torch.empty(0, dtype=torch.uint8), device=device)
        self.fitted_num_classes = num_classes
        self.dim = profiles.shape[1]
        return self

    def _set_buffers(self, profiles, labels, index, codes, device) -> None:
        self.memory_profiles = profiles.to(device, torch.float32).contiguous()
        self.memory_labels = labels.to(device, torch.long).contiguous()
        self.memory_index = index.to(device, torch.long).contiguous()
        self.memory_codes = codes.to(device, torch.uint8).contiguous()
        self._invalidate()

    def _check_labels(self, labels: torch.Tensor, num_items: int) -> torch.Tensor:
        check(isinstance(labels, torch.Tensor), f"fit labels must be a tensor (N,), got {type(labels).__name__}")
        check(labels.dim() == 1 and labels.shape[0] == num_items,
              f"fit got labels of shape {tuple(labels.shape)} for {num_items} profiles; pass one class index per profile, shape ({num_items},)")
        check(not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool,
              f"fit labels have dtype {labels.dtype}; pass integer class indices (torch.long)")
        labels = labels.detach().to("cpu", torch.long)
        check(int(labels.min()) >= 0, f"fit labels contain {int(labels.min())}; class indices must be >= 0")
        if self.num_classes is not None:
            check(int(labels.max()) < self.num_classes,
                  f"fit labels contain class {int(labels.max())} but num_classes={self.num_classes}; "
                  f"raise num_classes or pass num_classes=None")
        return labels

    # ------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {"memory": self.memory, "memory_options": dict(self.memory_options),
                "num_classes": self.fitted_num_classes, "dim": self.dim}

    def set_extra_state(self, state: dict) -> None:
        check(isinstance(state, dict) and state.get("memory") in MEMORY_KINDS,
              "the saved kNN state has no valid memory kind; save it with KNNClassifier.state_dict()")
        self.memory = state["memory"]
        self.memory_options = dict(state.get("memory_options") or {})
        self.fitted_num_classes = state.get("num_classes")
        self.dim = state.get("dim")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # the memory bank's size is data, not architecture: resize our buffers to the
        # incoming shapes so the default copy_ succeeds
        for name in BUFFERS:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor):
                current = self._buffers[name]
                self._buffers[name] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if self.dim is None and self.memory_profiles.dim() == 2 and self.memory_profiles.shape[1] > 0:
            self.dim = self.memory_profiles.shape[1]
        if len(self) and self.fitted_num_classes is None:
            self.fitted_num_classes = int(self.memory_labels.max()) + 1
        self._invalidate()

    def state_dict_extra(self) -> dict:
        """The memory bank and its description as a plain dict (same as ``state_dict()``)."""
        return dict(self.state_dict())

    def load_state(self, state: dict) -> "MemoryBank":
        """Restore from ``state_dict_extra()`` / ``state_dict()`` output (any memory size)."""
        self.load_state_dict(state)
        return self

    def _apply(self, fn, *args, **kwargs):
        self._invalidate()  # cached device copies and indices follow the buffers
        return super()._apply(fn, *args, **kwargs)

    def _invalidate(self) -> None:
        self._derived: Dict[Hashable, object] = {}

    def cached(self, key: Hashable, build: Callable[[], object]):
        """A structure derived from the buffers (a device copy, a search index), built once by
        ``build()`` and kept until the buffers change or move."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    # ------------------------------------------------------------ views of the stored profiles
    def __len__(self) -> int:
        return int(self.memory_labels.shape[0])

    def memory_bytes(self) -> int:
        """Bytes the memory keeps: every buffer (profiles or PQ codes, labels, indices)."""
        return sum(buf.numel() * buf.element_size() for buf in
                   (self.memory_profiles, self.memory_labels, self.memory_index, self.memory_codes))

    def numpy_profiles(self) -> np.ndarray:
        """(N, P) float32 contiguous CPU array; a view of the buffer when it lies on the CPU."""
        return self.cached("numpy", lambda: np.ascontiguousarray(
            self.memory_profiles.detach().to("cpu", torch.float32).numpy()))

    def ivfpq_index(self):
        """The faiss IVF-PQ index of an ivfpq memory, probing ``nprobe`` lists."""
        nprobe = self.memory_options.get("nprobe", DEFAULT_NPROBE)
        return self.cached("ivfpq", lambda: deserialize_index(self.memory_codes, nprobe))

    @torch.no_grad()
    def profiles_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Stored profiles of memory items ``idx`` (...,) -> (..., P) float32, on idx's device.

        Exact for full/condensed memories; PQ reconstructions (approximate) for ivfpq.
        """
        self.check_fitted("profiles_of")
        idx = torch.as_tensor(idx, dtype=torch.long)
        check(idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < len(self)),
              f"profiles_of got memory indices outside 0..{len(self) - 1}; pass indices returned by search")
        if self.memory != "ivfpq":
            return self.memory_profiles[idx.to(self.memory_profiles.device)].to(idx.device)
        flat = idx.reshape(-1).cpu().numpy().astype(np.int64)
        rebuilt = self.ivfpq_index().reconstruct_batch(flat) if len(flat) else np.empty((0, self.dim), np.float32)
        return torch.from_numpy(rebuilt).reshape(*idx.shape, self.dim).to(idx.device)

    def check_fitted(self, action: str) -> None:
        check(len(self) > 0,
              f"the kNN memory is empty: call fit(train_profiles, train_labels) or load a saved state before {action}")


# ---------------------------------------------------------------- checks shared with the classifier
def check_memory(memory: str, options: dict) -> None:
    """A known memory kind and only the options it accepts."""
    if memory not in MEMORY_KINDS:
        raise UnknownNameError("kNN memory", memory, MEMORY_KINDS)
    allowed = MEMORY_OPTIONS[memory]
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ProtoKNNError(f"unknown option {key!r} for memory={memory!r}.{hint} "
                                f"Options: {', '.join(allowed) if allowed else 'none'}.")


def check_profiles(profiles, what: str) -> torch.Tensor:
    """(N, P) finite floating tensor -> float32 contiguous (detached)."""
    check(isinstance(profiles, torch.Tensor), f"{what} must be a tensor (N, P), got {type(profiles).__name__}")
    check(profiles.dim() == 2,
          f"{what} must have shape (N, P), got {tuple(profiles.shape)}; for one profile use profile.unsqueeze(0)")
    check(profiles.shape[0] > 0 and profiles.shape[1] > 0,
          f"{what} is empty (shape {tuple(profiles.shape)}); pass at least one profile with at least one prototype score")
    check(profiles.is_floating_point(), f"{what} have dtype {profiles.dtype}; pass floating-point prototype profiles")
    profiles = profiles.detach().to(dtype=torch.float32).contiguous()
    # a NaN or inf anywhere makes the sum non-finite; the sum needs no (N, P) temporary,
    # so the exact count runs only in that (rare) case, which huge finite values may also hit
    bad = 0 if torch.isfinite(profiles.sum()) else int((~torch.isfinite(profiles)).sum())
    check(bad == 0, f"{what} contain {bad} non-finite values (NaN or inf); check the model's outputs "
                    f"(e.g. a diverged training run) before the kNN step")
    return profiles
