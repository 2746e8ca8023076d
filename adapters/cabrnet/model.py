"""ProtoKNN's top architecture for CaBRNet: ``ProtoKNNCaBRNet(extractor, ProtoKNNClassifier)``.

Named in ``model_arch.yml`` as ``top_arch: {module: protoknn_plugin.adapters.cabrnet.model,
name: ProtoKNNCaBRNet}``. CaBRNet's own loop does the training (``train_epoch`` is the
generic one: forward, ``loss``, one optimiser step per batch); this class adds what
ProtoKNN does differently:

* ``train_epoch``: CaBRNet's loop on class-balanced batches when dataset.yml names a
  ``ClassBalancedImageFolder`` train set (sampler.py); then, when dataset.yml has a
  ``val_set``, the kNN memory from the memory set, so that CaBRNet's per-epoch
  evaluation of ``val_set`` is kNN accuracy and ``--save-best val_set/accuracy max``
  keeps the epoch with the best real metric;
* ``register_training_params``: checks training.yml's parameter groups before CaBRNet
  builds its optimisers (param_groups.py);
* ``project``: eq. 14 through the plugin's ``project`` (every prototype moves to its
  most similar training patch of *any* class), reported in CaBRNet's projection format;
* ``epilogue`` (run by ``cabrnet train`` after the last epoch): projection, then the
  kNN memory from the profiles of the projection set (the training images without
  augmentation). ``final/model_state.pth`` therefore holds the memory bank;
* ``explain``: the counterfactual explanation of sec. 2.4 (nearest training sample vs
  the nearest one of another class, prototypes ranked by their contribution c_i);
* ``explain_global``: a gallery of the projected prototypes.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, SequentialSampler
from tqdm import tqdm

from cabrnet.archs.generic.model import CaBRNet

from protoknn_plugin.errors import ProtoKNNError, check
from protoknn_plugin.prototypes import project as project_prototypes

from .classifier import ProtoKNNClassifier
from .param_groups import cabrnet_groups, check_includes, check_proxies_alone
from .sampler import class_balanced_loader, is_class_balanced

EPILOGUE_OPTIONS = ("projection_set", "memory_set", "tqdm_position")
# Dataset names (dataset.yml) read during training: CaBRNet evaluates VALIDATION_SET after
# every epoch; the kNN memory for that evaluation comes from MEMORY_SET (the training
# images without augmentation, which the epilogue projects onto too).
VALIDATION_SET = "val_set"
MEMORY_SET = "projection_set"


class ProtoKNNCaBRNet(CaBRNet):
    """CaBRNet model for ProtoKNN. ``forward(x)`` returns the classifier's ``PrototypeOutputs``."""

    def __init__(self, extractor: nn.Module, classifier: ProtoKNNClassifier, **kwargs: Any):
        if not isinstance(classifier, ProtoKNNClassifier):
            raise ProtoKNNError(
                f"ProtoKNNCaBRNet needs a ProtoKNNClassifier, got {type(classifier).__name__}; set classifier "
                "module protoknn_plugin.adapters.cabrnet.classifier, name ProtoKNNClassifier in model_arch.yml")
        super().__init__(extractor, classifier, **kwargs)

    # ------------------------------------------------------------ training
    def loss(self, model_output: Any, label: Tensor, **kwargs: Any) -> Tuple[Tensor, Dict[str, float]]:
        """Eq. 13 -> (loss, stats with ``accuracy``); see ``ProtoKNNClassifier.loss``."""
        return self.classifier.loss(model_output, label)

    def register_training_params(self, training_config: Dict[str, Any]) -> None:
        # CaBRNet would copy `auxiliary_info` onto attributes of the model; ProtoKNN's loss
        # weights live in the classifier's params, so there is one place to set them.
        if training_config.get("auxiliary_info"):
            raise ProtoKNNError(
                "ProtoKNN takes no auxiliary_info in training.yml; set cluster_weight, aux_weight, margin, ... "
                "under classifier.params in model_arch.yml")
        # `cabrnet train` calls this before it builds the optimisers: fail here, in one line,
        # on the groups that would crash CaBRNet or train the proxies at the wrong rate.
        if training_config.get("param_groups"):
            check_includes(training_config["param_groups"], self)
            proxies = self.classifier.head.param_groups().get("proxies", [])
            if proxies:
                check_proxies_alone(cabrnet_groups(training_config, self), proxies)

    def train_epoch(self, dataloaders: Dict[str, DataLoader], optimizer_mngr: Any,
                    device: str | torch.device = "cuda:0", tqdm_position: int = 0, epoch_idx: int = 0,
                    verbose: bool = False) -> Dict[str, float]:
        """One epoch of CaBRNet's own loop, on class-balanced batches when the train set asks for them.

        Afterwards, if dataset.yml has a ``val_set``, the kNN memory is rebuilt from
        ``projection_set`` (one forward pass over it), so that the ``val_set`` evaluation
        CaBRNet runs next measures kNN accuracy (stats ``val_set/accuracy``,
        ``val_set/accuracy_k1``, ...). Without ``val_set`` the memory waits for the epilogue.
        """
        loaders = dict(dataloaders)
        if is_class_balanced(dataloaders["train_set"]):
            loaders["train_set"] = self._balanced_loader(dataloaders["train_set"])
        stats = self._train_epoch(loaders, optimizer_mngr, "train_set", device, tqdm_position, epoch_idx, verbose)
        if VALIDATION_SET in dataloaders:
            check(MEMORY_SET in dataloaders,
                  f"kNN validation on {VALIDATION_SET} needs the training images as {MEMORY_SET} in dataset.yml "
                  "(shuffle: False, no augmentation); add it")
            self.build_memory(dataloaders[MEMORY_SET], device=device, verbose=verbose)
        return stats

    def _balanced_loader(self, loader: DataLoader) -> DataLoader:
        # built once and kept: each new iterator draws a fresh epoch of batches
        if getattr(self, "_balanced", (None, None))[0] is not loader:
            self._balanced = (loader, class_balanced_loader(loader))
        return self._balanced[1]

    # ------------------------------------------------------------ projection and memory
    @torch.no_grad()
    def profiles(self, dataloader: DataLoader, device: str | torch.device = "cuda:0",
                 verbose: bool = False) -> Tuple[Tensor, Tensor]:
        """Profiles (N, P) float32 and labels (N,) of every image of ``dataloader``, on the CPU."""
        self.eval()
        self.to(device)
        profiles, labels = [], []
        for xs, ys in tqdm(dataloader, desc="Prototype profiles", leave=False, disable=not verbose):
            profiles.append(self.forward(xs.to(device)).profile.float().cpu())
            labels.append(torch.as_tensor(ys).long().cpu())
        check(len(profiles) > 0, "the dataloader given for the kNN memory is empty; check the dataset config")
        return torch.cat(profiles), torch.cat(labels)

    def build_memory(self, dataloader: DataLoader, device: str | torch.device = "cuda:0",
                     verbose: bool = False) -> int:
        """Rebuild the kNN memory from ``dataloader`` (use the projection set: no augmentation). Returns N."""
        profiles, labels = self.profiles(dataloader, device, verbose)
        self.classifier.fit_memory(profiles, labels)
        return len(labels)

    @torch.no_grad()
    def project(
        self,
        dataloader: DataLoader,
        device: str | torch.device = "cuda:0",
        verbose: bool = False,
        tqdm_position: int = 0,
        update_prototypes: bool = True,
    ) -> List[Dict[str, Any]]:
        """Eq. 14 over an unshuffled ``dataloader``; returns CaBRNet's projection info.

        One dict per prototype: proto_idx, img_idx (index in ``dataloader.dataset``), h, w
        (location in the feature map) and score (cosine similarity before the move).
        """
        check(isinstance(dataloader.sampler, SequentialSampler),
              "prototype projection needs the projection set in its stored order (img_idx refers to it); "
              "set `shuffle: False` for projection_set in dataset.yml")
        self.eval()
        self.to(device)
        layer = self.classifier.prototype_layer
        before = layer.prototypes.detach().clone()

        def batches():
            offset = 0
            for xs, ys in tqdm(dataloader, desc="Prototype projection", leave=False, position=tqdm_position,
                               disable=not verbose):
                indices = torch.arange(offset, offset + len(xs))
                offset += len(xs)
                yield self.extractor(xs.to(device)), torch.as_tensor(ys), indices

        record = project_prototypes(layer, batches())
        if not update_prototypes:
            layer.prototypes.data.copy_(before)
        width = record.map_size[1]
        return [
            {"img_idx": int(img), "h": int(loc) // width, "w": int(loc) % width, "score": float(score),
             "proto_idx": proto_idx}
            for proto_idx, (img, loc, score) in enumerate(zip(record.image_index, record.location, record.similarity))
        ]

    def epilogue(
        self,
        dataloaders: Dict[str, DataLoader],
        optimizer_mngr: Any,
        output_dir: str,
        device: str | torch.device = "cuda:0",
        verbose: bool = False,
        projection_set: str = "projection_set",
        memory_set: Optional[str] = None,
        tqdm_position: int = 0,
        **unknown: Any,
    ) -> List[Dict[str, Any]]:
        """After training: projection on ``projection_set``, then the kNN memory from ``memory_set``.

        ``memory_set`` defaults to ``projection_set`` (the training images without augmentation).
        Both names are options of the ``epilogue`` section of training.yml.
        """
        if unknown:
            raise ProtoKNNError(
                f"unknown ProtoKNN epilogue option(s) {', '.join(sorted(unknown))} in training.yml; "
                f"valid: {', '.join(EPILOGUE_OPTIONS)}")
        memory_set = memory_set or projection_set
        for name in (projection_set, memory_set):
            check(name in dataloaders,
                  f"the epilogue needs the dataset {name!r}, which dataset.yml does not define; "
                  f"add it (the training images, shuffle: False)")
        info = self.project(dataloaders[projection_set], device=device, verbose=verbose, tqdm_position=tqdm_position)
        self.build_memory(dataloaders[memory_set], device=device, verbose=verbose)
        return info

    # ------------------------------------------------------------ explanations
    @torch.no_grad()
    def counterfactual(self, img_tensor: Tensor, negative_class: Optional[int] = None) -> Dict[str, Any]:
        """Sec. 2.4 for one image tensor (1, 3, H, W).

        positive = nearest training sample, negative = nearest sample of ``negative_class``
        (default: the nearest sample whose class differs from the positive's). Returns
        prediction (majority vote at k), positive/negative memory indices and classes,
        and contributions (P,) c_i = (s_a - s_n)^2 - (s_a - s_p)^2, summing to d_an^2 - d_ap^2.
        """
        knn = self.classifier.head.knn
        check(self.classifier.has_memory, "the kNN memory is empty; explain a model saved after the "
                                          "training epilogue (the `final` checkpoint)")
        anchor = self.forward(img_tensor).profile[:1].float()
        prediction = int(knn.predict(anchor)[0])
        _, nearest = knn.search(anchor, 1)
        positive = int(nearest[0, 0])
        labels = knn.memory_labels.cpu()
        positive_class = int(labels[positive])
        if negative_class is None:
            others = sorted(set(labels.tolist()) - {positive_class})
            check(len(others) > 0, "the kNN memory holds a single class; there is no counterfactual class")
            candidates = [knn.nearest_of_class(anchor, c) for c in others]
            best = min(range(len(others)), key=lambda i: float(candidates[i][0][0]))
            negative, negative_class = int(candidates[best][1][0]), others[best]
        else:
            negative = int(knn.nearest_of_class(anchor, int(negative_class))[1][0])
        stored = knn.profiles_of(torch.tensor([positive, negative])).to(anchor.device)
        contributions = (anchor[0] - stored[1]).square() - (anchor[0] - stored[0]).square()
        return {"prediction": prediction, "positive": positive, "positive_class": positive_class,
                "negative": negative, "negative_class": int(negative_class),
                "positive_index": int(knn.memory_index[positive]), "negative_index": int(knn.memory_index[negative]),
                "contributions": contributions.cpu()}

    def explain(
        self,
        img: str | Image.Image,
        preprocess: Callable | None,
        visualizer: Any,
        prototype_dir: str = "",
        output_dir: str = "",
        output_format: str = "pdf",
        device: str | torch.device = "cuda:0",
        exist_ok: bool = False,
        disable_rendering: bool = False,
        num_closest: int = 10,
        negative_class: Optional[int] = None,
        **kwargs: Any,
    ) -> List[Tuple[int, float, bool]]:
        """Counterfactual explanation: the ``num_closest`` prototypes with the largest c_i.

        Returns [(prototype index, c_i, c_i > 0)]: a positive c_i says the image looks like
        the positive (the prediction) rather than the negative on that prototype. With
        rendering, a graph of each prototype's test patch and its source patch (from
        ``prototype_dir``, written by ``cabrnet explain_global``/``extract_prototypes``).
        """
        from cabrnet.core.utils.image import safe_open_image
        from cabrnet.core.visualization.explainer import ExplanationGraph

        self.eval()
        with safe_open_image(img, preprocess) as (image, img_tensor):
            self.to(device)
            img_tensor = img_tensor.to(device)
            result = self.counterfactual(img_tensor, negative_class)
            contributions = result["contributions"]
            order = torch.argsort(contributions, descending=True)[:num_closest].tolist()
            relevant = [(i, float(contributions[i]), bool(contributions[i] > 0)) for i in order]
            if disable_rendering:
                return relevant
            os.makedirs(os.path.join(output_dir, "test_patches"), exist_ok=exist_ok)
            img_path = os.path.join(output_dir, "original.png")
            image.save(img_path)
            graph = ExplanationGraph(output_dir=output_dir)
            graph.set_test_image(
                img_path=img_path,
                label=(f"nearest: training image {result['positive_index']} (class {result['positive_class']})\n"
                       f"vs class {result['negative_class']} (training image {result['negative_index']})"))
            for proto_idx, contribution, _ in relevant:
                patch_path = os.path.join(output_dir, "test_patches", f"proto_similarity_{proto_idx}.png")
                patch = visualizer.forward(img=image, img_tensor=img_tensor, proto_idx=proto_idx, device=device)
                patch.save(patch_path)
                graph.add_similarity(
                    prototype_img_path=os.path.join(prototype_dir, f"prototype_{proto_idx}.png"),
                    test_patch_img_path=patch_path,
                    label=f"Prototype {proto_idx}\n(contribution {contribution:+.3f})",
                    font_color="black" if contribution > 0 else "red",
                )
            graph.add_prediction(result["prediction"])
            graph.render(output_format=output_format)
            return relevant

    def explain_global(self, prototype_dir: str, output_dir: str, output_format: str = "pdf", **kwargs: Any) -> None:
        """A gallery of every projected prototype (ProtoKNN's prototypes belong to no class)."""
        import graphviz

        graph = graphviz.Graph()
        graph.attr(layout="circo")
        graph.attr("node", label="", fixedsize="True", width="2", height="2", fontsize="25")
        graph.node(name="root", shape="circle", label=f"ProtoKNN\n{self.num_prototypes} prototypes", root="True")
        for proto_idx in range(self.num_prototypes):
            path = os.path.abspath(os.path.join(prototype_dir, f"prototype_{proto_idx}.png"))
            graph.node(name=f"P{proto_idx}", shape="plaintext", xlabel=f"P{proto_idx}", image=path, imagescale="true")
            graph.edge("root", f"P{proto_idx}")
        graph.render(filename=os.path.join(output_dir, "global_explanation"), format=output_format)
