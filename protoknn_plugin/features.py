"""Frozen-backbone mode: the backbone's maps computed once per split and kept on disk.

With a frozen backbone every epoch would run the same images through the same weights;
``FeatureCache`` runs them once (eval mode, no augmentation, batched) and stores the maps
(N, C, h, w) as a memory-mapped ``.npy`` (float16 by default, float32 on request) with the
labels and a JSON manifest. Training then reads maps instead of images, inside
``model.frozen_backbone()``, for every head alike (``protoknn_plugin.frozen`` wires it up).

A split's cache lives in ``<cache dir>/<dataset>-<split>-<key>/``; the key hashes what the
maps depend on: dataset name, data folder, limit, crop, image size, split, its labels,
backbone name, options and weights source, and a digest of the backbone's actual tensors
(so fine-tuned or edited weights rebuild it). It is built in a temporary folder and renamed
into place when complete, so an interrupted build leaves nothing that would be reused.
Only ``numpy.load(..., allow_pickle=False)`` and JSON read it back: a cache runs no code.

Cache folder: ``cache_dir`` argument, else ``$PROTOKNN_CACHE``, else ``~/.cache/protoknn/features``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .errors import ProtoKNNError, check

CACHE_FORMAT = 1  # bump when the layout changes, so old caches are not misread
DTYPES = ("float16", "float32")
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROTOKNN_CACHE") or "~/.cache/protoknn/features").expanduser()


def weights_digest(module: nn.Module) -> str:
    """sha256 of every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def labels_digest(labels: Tensor) -> str:
    return hashlib.sha256(torch.as_tensor(labels, dtype=torch.int64).numpy().tobytes()).hexdigest()


class CachedFeatures(Dataset):
    """Items ``(map: float32 Tensor (C, h, w), label: int)`` from a memory-mapped array (N, C, h, w)."""

    def __init__(self, maps: np.ndarray, labels: Tensor, folder: Optional[Path] = None):
        check(len(maps) == len(labels), f"{len(maps)} cached maps but {len(labels)} labels.")
        self.maps, self.labels, self.folder = maps, torch.as_tensor(labels, dtype=torch.long), folder

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return torch.from_numpy(np.array(self.maps[index], dtype=np.float32)), int(self.labels[index])

    def subset(self, indices) -> "CachedFeatures":
        """The items at ``indices``, in that order (e.g. a validation split carved from train)."""
        return _CachedSubset(self, torch.as_tensor(indices, dtype=torch.long))

    def with_transform(self, transform) -> "CachedFeatures":
        """Maps take no image transform (no augmentation in frozen mode): the same dataset."""
        return self


class _CachedSubset(CachedFeatures):
    """A view of some items of a ``CachedFeatures``; the maps stay memory-mapped, not copied."""

    def __init__(self, base: CachedFeatures, indices: Tensor):
        super().__init__(base.maps, base.labels, base.folder)
        self.indices, self.labels = indices, base.labels[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return torch.from_numpy(np.array(self.maps[int(self.indices[index])], dtype=np.float32)), int(self.labels[index])


class FeatureCache:
    """Builds or reuses the maps of one split; ``built``/``reused`` list the folders this instance touched."""

    def __init__(self, root: Optional[os.PathLike] = None, dtype: str = "float16", batch_size: int = 16,
                 progress: bool = True, log: Optional[Callable[[str], None]] = None, channels_last: bool = True):
        """``channels_last``: run the backbone in that memory layout while building, faster for
        EfficientNet's depthwise convolutions on CPU; the maps then differ from the default
        layout's by float32 rounding (~1e-7 relative), far below float16 storage's 2^-11.
        ``batch_size`` 16: on CPU a larger batch gains nothing and its activations (67 MB per
        tensor at 128 px x 128 images) are mmap'd and zeroed anew by malloc, which costs CPU time
        (docs/history.md has the measurement)."""
        check(dtype in DTYPES, f"feature cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.dtype, self.batch_size, self.progress = dtype, batch_size, progress
        self.channels_last = channels_last
        self.log = log if log is not None else (lambda message: None)
        self.built: list = []
        self.reused: list = []

    def folder(self, identity: Dict[str, Any]) -> Path:
        blob = json.dumps({**identity, "format": CACHE_FORMAT, "dtype": self.dtype}, sort_keys=True, default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        return self.root / f"{identity.get('dataset', 'data')}-{identity.get('split', 'split')}-{key}"

    def load_or_build(self, backbone: nn.Module, dataset: Dataset, identity: Dict[str, Any],
                      device: Optional[torch.device] = None) -> CachedFeatures:
        """The split's cached maps: reused when ``identity`` matches a complete cache, else computed now."""
        folder = self.folder(identity)
        cached = self._load(folder, identity)
        if cached is not None:
            self.reused.append(folder)
            self.log(f"feature cache: reused {identity.get('split')} ({len(cached)} maps) from {folder}")
            return cached
        if folder.exists():  # complete once, then damaged or edited by hand: replace it
            shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        self._build(backbone, dataset, identity, folder, device)
        self.built.append(folder)
        cached = self._load(folder, identity)
        check(cached is not None, f"feature cache {folder} could not be read back after building; "
                                  "check the disk, or pass another --cache-dir")
        self.log(f"feature cache: built {identity.get('split')} ({len(cached)} maps) in "
                 f"{time.perf_counter() - started:.1f} s at {folder}")
        return cached

    # ---- reading ---------------------------------------------------------------------
    def _load(self, folder: Path, identity: Dict[str, Any]) -> Optional[CachedFeatures]:
        """The cache at ``folder`` if it is complete and made for ``identity``, else None."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            maps = np.load(folder / "maps.npy", mmap_mode="r", allow_pickle=False)
            labels = np.load(folder / "labels.npy", allow_pickle=False)
        except (OSError, ValueError):  # absent, or damaged by hand: build it again
            return None
        same = (manifest.get("identity") == json.loads(json.dumps(identity, default=str))
                and manifest.get("format") == CACHE_FORMAT and manifest.get("dtype") == self.dtype
                and list(maps.shape) == manifest.get("shape") and labels.shape == (maps.shape[0],))
        return CachedFeatures(maps, torch.from_numpy(labels.astype(np.int64)), folder) if same else None

    # ---- building --------------------------------------------------------------------
    @torch.no_grad()
    def _build(self, backbone: nn.Module, dataset: Dataset, identity: Dict[str, Any], folder: Path,
               device: Optional[torch.device]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ProtoKNNError(f"cannot create the feature cache folder {self.root} ({err.strerror or err}); "
                                "pass --cache-dir to a folder you can write") from None
        _remove_abandoned(self.root, folder.name)
        tmp = self.root / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            shape = self._compute(backbone, dataset, tmp, device, identity.get("split", ""))
            manifest = {"identity": identity, "format": CACHE_FORMAT, "dtype": self.dtype, "shape": list(shape)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            _publish(tmp, folder)
        except BaseException:  # Ctrl-C and errors alike: no half cache stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _compute(self, backbone: nn.Module, dataset: Dataset, tmp: Path, device, split: str) -> tuple:
        was_training = backbone.training
        backbone.eval()
        device = device or next(iter(backbone.parameters()), torch.zeros(())).device
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        backbone.to(memory_format=layout)  # the parameters' layout only: their values stay
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)
        maps = None
        labels = np.empty(len(dataset), dtype=np.int64)
        start = 0
        try:
            with _progress(self.progress, f"caching {split} maps", len(dataset)) as advance:
                for images, y in loader:
                    out = backbone(images.to(device).contiguous(memory_format=layout)).float().cpu().numpy()
                    if maps is None:
                        maps = np.lib.format.open_memmap(tmp / "maps.npy", mode="w+", dtype=self.dtype,
                                                         shape=(len(dataset), *out.shape[1:]))
                    maps[start:start + len(out)] = out
                    labels[start:start + len(out)] = torch.as_tensor(y).numpy()
                    start += len(out)
                    advance(len(out))
        finally:
            backbone.to(memory_format=torch.contiguous_format)
            backbone.train(was_training)
        check(maps is not None and start == len(dataset), f"the {split} split is empty; nothing to cache")
        maps.flush()
        shape = maps.shape
        del maps
        np.save(tmp / "labels.npy", labels, allow_pickle=False)
        return shape


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished folder into place (atomic); if another process published it first, keep theirs."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned(root: Path, name: str) -> None:
    """Delete temporary folders of this cache left by builds whose process is gone (a kill -9)."""
    for tmp in root.glob(f".{name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on a terminal; nothing otherwise (the summary line is logged)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)


__all__ = ["CachedFeatures", "FeatureCache", "default_cache_dir", "labels_digest", "weights_digest"]
