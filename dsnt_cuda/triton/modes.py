"""The option enums of csrc/dsnt_math.h for the Triton kernels, with the same values: a mode's
index in the reference's tuple of names (coordinate losses: 0 is "none", no fused loss)."""

import triton.language as tl

from dsnt_cuda.reference import COORD_LOSSES as _COORD_LOSS_NAMES
from dsnt_cuda.reference import NORMALIZATIONS as _NORMALIZATION_NAMES
from dsnt_cuda.reference import REGULARIZERS as _REGULARIZER_NAMES

NORMALIZATIONS = {name: i for i, name in enumerate(_NORMALIZATION_NAMES)}
REGULARIZERS = {name: i for i, name in enumerate(_REGULARIZER_NAMES)}
COORD_LOSSES = {name: i for i, name in enumerate(("none", *_COORD_LOSS_NAMES))}

SOFTMAX, ABS, RELU, SIGMOID, NONE = map(tl.constexpr, NORMALIZATIONS.values())
REG_NONE, JS, KL, VAR = map(tl.constexpr, REGULARIZERS.values())
LOSS_NONE, EUCLIDEAN, L1, MSE = map(tl.constexpr, COORD_LOSSES.values())
