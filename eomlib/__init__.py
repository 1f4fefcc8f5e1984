"""eomlib: the equation of motion (EoM) of gradient descent, computed.

Gradient descent (GD) takes steps ``params - lr * g``; gradient flow (GF) is the
limit ``d params/dt = -g`` as ``lr -> 0``. The EoM ``d params/dt = -g - lr * xi``
adds the counter term ``xi = xi_1 + lr xi_2 + ...`` so that its solution passes
through the GD iterates at ``t = k * lr``.

The public names below are a contract: the book's chapters and readers' own code
build on them.
"""

from eomlib import distributed
from eomlib.cache import Cache, cached, code_version
from eomlib.counter_terms import counter_terms
from eomlib.data import DATASETS, Dataset, load_dataset
from eomlib.derivatives import (
    SecondDerivativeError,
    batched_hvp,
    grad,
    grad_and_hvp,
    grad_derivative,
    hvp,
    top_eigenvalue,
)
from eomlib.figures import savefig, use_style
from eomlib.flows import (
    Comparison,
    DivergenceError,
    SeriesDivergenceError,
    compare_with_gd,
    discretization_errors,
    distance,
    eom_field,
    eom_trajectory,
    field_from_iterates,
    gd_trajectory,
    integrate,
    optimizer_trajectory,
    roundoff_floor,
)
from eomlib.models import (
    MODELS,
    Problem,
    initial_params,
    make_loss,
    make_model,
    make_problem,
)
from eomlib.optimizers import modified_field
from eomlib.optimizers.minibatch import (
    ShuffleMean,
    confidence_interval,
    mean_over_shuffles,
    minibatch_field,
    sgd_epochs,
)
from eomlib.parameters import check_parameters
from eomlib.resummation import principal_flow_field, resummed_rate, truncated_rate
from eomlib.spectrum import (
    Eigenpairs,
    SharpnessTrack,
    SharpnessTracker,
    dense_hessian,
    top_eigenpairs,
    track_sharpness,
)
from eomlib.symmetries import Symmetries, find_symmetries, with_weight_decay

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "MODELS",
    "Dataset",
    "Eigenpairs",
    "Comparison",
    "DivergenceError",
    "Problem",
    "SecondDerivativeError",
    "SeriesDivergenceError",
    "ShuffleMean",
    "SharpnessTrack",
    "SharpnessTracker",
    "batched_hvp",
    "Cache",
    "cached",
    "check_parameters",
    "code_version",
    "compare_with_gd",
    "confidence_interval",
    "counter_terms",
    "dense_hessian",
    "discretization_errors",
    "distributed",
    "distance",
    "eom_field",
    "eom_trajectory",
    "field_from_iterates",
    "gd_trajectory",
    "grad",
    "grad_and_hvp",
    "grad_derivative",
    "hvp",
    "initial_params",
    "integrate",
    "load_dataset",
    "make_loss",
    "make_model",
    "make_problem",
    "mean_over_shuffles",
    "minibatch_field",
    "modified_field",
    "optimizer_trajectory",
    "principal_flow_field",
    "resummed_rate",
    "roundoff_floor",
    "Symmetries",
    "find_symmetries",
    "savefig",
    "sgd_epochs",
    "top_eigenpairs",
    "top_eigenvalue",
    "track_sharpness",
    "truncated_rate",
    "use_style",
    "with_weight_decay",
]
