"""Measuring explanations, not only accuracy.

* ``deletion``: occlude the boxes of the prototypes an explanation names (top-m by c_i for
  ProtoKNN, by w_(c,i) * s_i for linear heads) and measure the drop, against two random
  controls (``scorers``, ``occlusion``).
* ``stability``: the most activated patch under Gaussian noise (Huang et al. 2023).
* ``consistency``: the same annotated part in >= 80% of a class's images (Huang et al. 2023).
* ``purity``: the class mix of each prototype's 10 nearest training patches.

``evaluate_faithfulness(model, splits)`` measures a model; ``faithfulness_for_run(run_dir)``
a finished run directory (flat metrics; writes RUN_DIR/faithfulness.json).
"""
from .consistency import consistency, covered_parts, part_frequencies, prototype_classes
from .deletion import CONDITIONS, DeletionStats, deletion_test, forward_in_chunks
from .measure import evaluate_faithfulness, flat_metrics, sample_indices
from .occlusion import covered_fraction, mean_fill, occlude, random_boxes_like
from .purity import NearestPatches, nearest_patches, purity
from .run import RESULT_NAME, faithfulness_for_run, measure_run
from .scorers import KNNMarginScorer, LinearLogitScorer, create_scorer
from .stability import stability

__all__ = [
    "CONDITIONS", "DeletionStats", "KNNMarginScorer", "LinearLogitScorer", "NearestPatches", "RESULT_NAME",
    "consistency", "covered_fraction", "covered_parts", "create_scorer", "deletion_test", "evaluate_faithfulness",
    "faithfulness_for_run", "flat_metrics", "forward_in_chunks", "mean_fill", "measure_run", "nearest_patches",
    "occlude", "part_frequencies", "prototype_classes", "purity", "random_boxes_like", "sample_indices", "stability",
]
