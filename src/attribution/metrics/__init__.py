"""Evaluation metrics: faithfulness, localisation, sanity and complexity, batched in torch on the input's device.

Every metric states its protocol as parameters whose defaults are the paper's (or its reference code's); see each
module's docstring for the source and any deliberate difference.  Perturbation metrics take
``(model, images, maps, target)``; localisation metrics take ``(maps, regions)``; :func:`evaluate` runs an
explainer and a list of metrics in one call and returns a table.
"""
from .common import Curve, gaussian_blur, make_substrate, pixel_map, rise_blur
from .complexity import entropy, gini
from .components import ComponentBoxes, component_boxes, connected_components, hole_boxes
from .confidence import ConfidenceChange, average_drop, confidence_change, increase_in_confidence
from .evaluation import METRICS, EvaluationTable, evaluate
from .faithfulness import faithfulness_correlation, sensitivity_n
from .insertion_deletion import delete_score, deletion, insert_score, insertion
from .keep_remove import (kam, keep_absolute_mask, keep_negative_mask, keep_positive_mask, kpm, knm, ram,
                          remove_absolute_mask, shap_fractions)
from .localisation import Pointing, attribution_localisation, energy_pointing_game, pointing_game
from .regions import box_iou, boxes_to_mask, region_mask
from .imputation import linear_impute, noisy_linear_impute
from .infidelity_sensitivity import infidelity, max_sensitivity
from .remove_and_debias import RoadResult, road
from .salience_guided import saco
from .sanity import (DataRandomisationResult, RandomisationResult, data_randomisation, model_randomisation,
                     randomisation_layers, reinitialise)
from .similarity import (class_specific_spearman_rank_corr, rank_data, spearman, spearman_rank_correlation_value,
                         ssim)
from .wsol import (BoxAccuracy, PixelAP, binarize, box_accuracy, cam_to_boxes, cam_to_mask, max_box_acc,
                   max_box_acc_v2, normalize_scoremap, pxap, wsol_thresholds)

__all__ = [
    "METRICS",
    "BoxAccuracy",
    "ComponentBoxes",
    "ConfidenceChange",
    "DataRandomisationResult",
    "Curve",
    "EvaluationTable",
    "PixelAP",
    "Pointing",
    "RandomisationResult",
    "RoadResult",
    "attribution_localisation",
    "average_drop",
    "binarize",
    "box_accuracy",
    "box_iou",
    "boxes_to_mask",
    "cam_to_boxes",
    "cam_to_mask",
    "class_specific_spearman_rank_corr",
    "component_boxes",
    "confidence_change",
    "data_randomisation",
    "connected_components",
    "delete_score",
    "deletion",
    "energy_pointing_game",
    "entropy",
    "evaluate",
    "faithfulness_correlation",
    "gaussian_blur",
    "gini",
    "hole_boxes",
    "increase_in_confidence",
    "infidelity",
    "insert_score",
    "insertion",
    "kam",
    "keep_absolute_mask",
    "keep_negative_mask",
    "keep_positive_mask",
    "knm",
    "kpm",
    "linear_impute",
    "make_substrate",
    "max_box_acc",
    "max_sensitivity",
    "max_box_acc_v2",
    "model_randomisation",
    "noisy_linear_impute",
    "normalize_scoremap",
    "pixel_map",
    "pointing_game",
    "pxap",
    "ram",
    "randomisation_layers",
    "rank_data",
    "region_mask",
    "reinitialise",
    "remove_absolute_mask",
    "rise_blur",
    "road",
    "saco",
    "sensitivity_n",
    "shap_fractions",
    "spearman",
    "spearman_rank_correlation_value",
    "ssim",
    "wsol_thresholds",
]
