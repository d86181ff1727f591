"""Evaluation metrics: faithfulness, localisation, sanity and complexity, batched in torch on the input's device.

Every metric states its protocol as parameters whose defaults are the paper's (or its reference code's); see each
module's docstring for the source and any deliberate difference.  Perturbation metrics take
``(model, images, maps, target)``; localisation metrics take ``(maps, regions)``; :func:`evaluate` runs an
explainer and a list of metrics in one call and returns a table.
"""
from .common import Curve, gaussian_blur, make_substrate, pixel_map, rise_blur
from .axioms import CompletenessResult, completeness, non_sensitivity
from .complexity import discrete_entropy, effective_complexity, entropy, gini, histogram
from .components import ComponentBoxes, component_boxes, connected_components, hole_boxes
from .confidence import ConfidenceChange, average_drop, confidence_change, increase_in_confidence
from .evaluation import METRICS, EvaluationTable, evaluate
from .faithfulness import faithfulness_correlation, sensitivity_n
from .ground_truth import focus, localisation_auc, relevance_rank_accuracy, top_k_intersection
from .invariance import InvarianceResult, absorb_shift, input_invariance
from .insertion_deletion import delete_score, deletion, insert_score, insertion
from .keep_remove import (kam, keep_absolute_mask, keep_negative_mask, keep_positive_mask, kpm, knm, ram,
                          remove_absolute_mask, shap_fractions)
from .local_sufficiency import map_distances, sufficiency
from .localisation import Pointing, attribution_localisation, energy_pointing_game, pointing_game
from .regions import box_iou, boxes_to_mask, region_mask
from .imputation import linear_impute, noisy_linear_impute
from .infidelity_sensitivity import avg_sensitivity, infidelity, max_sensitivity
from .perturbation_faithfulness import (AopcCurve, IrofCurve, MonotonicityCurve, faithfulness_estimate, irof,
                                        monotonicity, monotonicity_correlation, region_perturbation, selectivity)
from .randomisation import pair_ssim, random_logit
from .remove_and_debias import RoadResult, road
from .robustness import (consistency, continuity, local_lipschitz_estimate, relative_input_stability,
                         relative_output_stability, relative_representation_stability)
from .salience_guided import saco
from .sanity import (DataRandomisationResult, RandomisationResult, data_randomisation, model_randomisation,
                     randomisation_layers, randomised_copies, reinitialise)
from .sanity_revisited import SmoothRandomisationResult, efficient_mprt, smooth_mprt
from .similarity import (class_specific_spearman_rank_corr, rank_data, spearman, spearman_rank_correlation_value,
                         ssim)
from .wsol import (BoxAccuracy, PixelAP, binarize, box_accuracy, cam_to_boxes, cam_to_mask, max_box_acc,
                   max_box_acc_v2, normalize_scoremap, pxap, wsol_thresholds)

__all__ = [
    "METRICS",
    "AopcCurve",
    "BoxAccuracy",
    "CompletenessResult",
    "ComponentBoxes",
    "ConfidenceChange",
    "Curve",
    "DataRandomisationResult",
    "EvaluationTable",
    "InvarianceResult",
    "IrofCurve",
    "MonotonicityCurve",
    "PixelAP",
    "Pointing",
    "RandomisationResult",
    "RoadResult",
    "SmoothRandomisationResult",
    "absorb_shift",
    "attribution_localisation",
    "average_drop",
    "avg_sensitivity",
    "binarize",
    "box_accuracy",
    "box_iou",
    "boxes_to_mask",
    "cam_to_boxes",
    "cam_to_mask",
    "class_specific_spearman_rank_corr",
    "completeness",
    "component_boxes",
    "confidence_change",
    "connected_components",
    "consistency",
    "continuity",
    "data_randomisation",
    "delete_score",
    "deletion",
    "discrete_entropy",
    "effective_complexity",
    "efficient_mprt",
    "energy_pointing_game",
    "entropy",
    "evaluate",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "focus",
    "gaussian_blur",
    "gini",
    "histogram",
    "hole_boxes",
    "increase_in_confidence",
    "infidelity",
    "input_invariance",
    "insert_score",
    "insertion",
    "irof",
    "kam",
    "keep_absolute_mask",
    "keep_negative_mask",
    "keep_positive_mask",
    "knm",
    "kpm",
    "linear_impute",
    "local_lipschitz_estimate",
    "localisation_auc",
    "make_substrate",
    "map_distances",
    "max_box_acc",
    "max_box_acc_v2",
    "max_sensitivity",
    "model_randomisation",
    "monotonicity",
    "monotonicity_correlation",
    "noisy_linear_impute",
    "non_sensitivity",
    "normalize_scoremap",
    "pair_ssim",
    "pixel_map",
    "pointing_game",
    "pxap",
    "ram",
    "random_logit",
    "randomisation_layers",
    "randomised_copies",
    "rank_data",
    "region_mask",
    "region_perturbation",
    "reinitialise",
    "relative_input_stability",
    "relative_output_stability",
    "relative_representation_stability",
    "relevance_rank_accuracy",
    "remove_absolute_mask",
    "rise_blur",
    "road",
    "saco",
    "selectivity",
    "sensitivity_n",
    "shap_fractions",
    "smooth_mprt",
    "spearman",
    "spearman_rank_correlation_value",
    "ssim",
    "sufficiency",
    "top_k_intersection",
    "wsol_thresholds",
]
