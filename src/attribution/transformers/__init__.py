"""Transformers: token layouts, attention capture, and transformer-native methods."""
from .ag_cam import AGCAM
from .alti import ALTI
from .atman import AtMan
from .attcat import AttCAT
from .attention import AttentionCapture
from .attention_flow import AttentionFlow
from .beyond_intuition import BeyondIntuition
from .decompx import DecompX
from .generic_attention import GenericAttention
from .grad_rollout import GradientRollout
from .grad_sam import GradSAM
from .legrad import LeGrad
from .mda import MDA
from .norm_based import AttentionNorm, GlobEnc
from .raw_attention import RawAttention
from .rollout import AttentionRollout
from .tam import TAM
from .tis import TIS
from .token_tm import TokenTM
from .tokens import TokenLayout, token_layout, tokens_to_map
from .transformer_attribution import TransformerAttribution
from .value_zeroing import ValueZeroing

__all__ = ["AGCAM", "ALTI", "AtMan", "AttCAT", "AttentionCapture", "AttentionFlow", "AttentionNorm", "AttentionRollout", "BeyondIntuition", "DecompX", "GenericAttention", "GlobEnc", "GradientRollout",
           "GradSAM", "LeGrad", "MDA", "RawAttention", "TAM", "TIS", "TokenLayout", "TokenTM", "TransformerAttribution",
           "ValueZeroing", "token_layout", "tokens_to_map"]
