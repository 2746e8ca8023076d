"""The page of a decision tree head (ProtoTree): the pruned tree drawn as nested lists, every
routing node with its prototype's patch, every leaf with its most likely classes."""
from __future__ import annotations

from typing import List

import torch

from ..explain import source_boxes
from ..heads.prototree import reachable
from .gallery import PAGE as GALLERY
from .html import esc, figure, link, write_page

PAGE = "tree.html"
LEAF_CLASSES = 2


def _leaf(model, splits, leaf: int) -> str:
    distribution = model.head.leaf_distribution(leaf).cpu()
    top = torch.argsort(distribution, descending=True)[:LEAF_CLASSES].tolist()
    shown = ", ".join(f"{esc(splits.classes[c])} {float(distribution[c]):.3f}" for c in top)
    return f"<li><strong>leaf {leaf}</strong>: {shown}</li>"


def _node(model, splits, tiles, sources, node: int, internal: int, routes) -> str:
    """The subtree under ``node`` as HTML; nodes forced by pruning hand over to their kept child."""
    if node >= internal:
        return _leaf(model, splits, node - internal)
    forced = int(routes[node])
    if forced:
        return _node(model, splits, tiles, sources, 2 * node + (2 if forced > 0 else 1), internal, routes)
    box, _, _ = sources[node]
    src = int(model.projection.image_index[node])
    patch = figure(tiles.write(f"tree-n{node}", splits.train_plain[src][0], crop=box),
                   f"node {node}: the patch of its prototype, from training image #{src}", f"node {node}")
    children = "".join(f"<li>{side}<ul>{_node(model, splits, tiles, sources, child, internal, routes)}</ul></li>"
                       for side, child in (("absent (s ≤ 0.5): left", 2 * node + 1),
                                           ("present (s > 0.5): right", 2 * node + 2)))
    return (f'<li><a href="{GALLERY}#p{node}">node {node}</a><div class="row">{patch}</div>'
            f"<ul>{children}</ul></li>")


def write_tree_page(out, model, splits, tiles, nav) -> str:
    """Write PAGE under ``out`` for a tree head's model; returns its name."""
    head = model.head
    routes = head.routes.cpu()
    internal = len(routes)
    seen = reachable(routes)
    kept: List[int] = [n for n in range(internal) if seen[n] and int(routes[n]) == 0]
    sources = source_boxes(model, splits.train_plain, kept)
    size = head.stage_info(lambda: None)
    intro = (f"<p>The tree after pruning: {int(size['tree_internal_nodes'])} routing nodes and "
             f"{int(size['tree_leaves'])} leaves (of {internal} and {internal + 1} before). Each node shows the "
             "patch its prototype was projected onto; an image goes right where that patch is present "
             "(s = exp(−distance) &gt; 0.5) and left where it is absent. Leaves list their most likely classes.</p>")
    body = intro + f"<ul>{_node(model, splits, tiles, sources, 0, internal, routes)}</ul>"
    write_page(out / PAGE, f"The tree of {head.name}", body, nav)
    return PAGE


def tree_link(out, model, splits, tiles, nav) -> str:
    """" See the tree." linking to the tree page written for a tree head; "" for any other head."""
    if model.head.explanation != "decision-path":
        return ""
    return " " + link(write_tree_page(out, model, splits, tiles, nav), "See the tree") + "."
