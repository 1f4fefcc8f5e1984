"""Bad input to the public functions: each is refused before any long computation,
with a message that names the parameter, the value given and what is allowed.

The runner's checks of notebook parameters are in ``test_runner.py``; the data
sets' in ``test_data.py``.
"""

import pytest
import torch

import eomlib


def _never(x):
    raise AssertionError("the loss must not be evaluated")


def _square(x):
    return (x**2).sum()


X = torch.zeros(2, dtype=torch.float64)
INTEGERS = torch.zeros(2, dtype=torch.int64)

BAD_CALLS = {
    # Learning rates: positive and finite, everywhere one is taken.
    "lr <= 0 in GD": (
        lambda: eomlib.gd_trajectory(_never, X, 0.0, 3),
        ValueError,
        r"lr must be positive and finite; got lr=0.0",
    ),
    "lr = inf in the EoM field": (
        lambda: eomlib.eom_field(_never, float("inf"), 1),
        ValueError,
        r"lr must be positive and finite; got lr=inf",
    ),
    "lr = nan in a comparison": (
        lambda: eomlib.compare_with_gd(_never, X, float("nan"), 3),
        ValueError,
        r"lr must be positive and finite; got lr=nan",
    ),
    "a string for lr": (
        lambda: eomlib.eom_trajectory(_never, X, "0.1", 3, 1),
        TypeError,
        r"lr must be a positive real number; got '0.1'",
    ),
    "a bad lr last in a list": (
        lambda: eomlib.discretization_errors(_never, X, [0.1, 0.2, -0.4], (0, 1)),
        ValueError,
        r"lrs\[2\] must be positive and finite; got lrs\[2\]=-0.4",
    ),
    # Orders: integers >= 0 (>= 1 for the counter terms themselves).
    "a negative order of the EoM": (
        lambda: eomlib.eom_field(_never, 0.1, -1),
        ValueError,
        r"order must be an integer >= 0; got order=-1",
    ),
    "order 0 of the counter terms": (
        lambda: eomlib.counter_terms(_never, X, 0),
        ValueError,
        r"order must be an integer >= 1; got order=0",
    ),
    "a fractional order": (
        lambda: eomlib.counter_terms(_never, X, 1.5),
        TypeError,
        r"order must be an integer >= 1; got 1.5",
    ),
    "a negative order among several": (
        lambda: eomlib.compare_with_gd(_never, X, 0.1, 3, orders=(0, 1, -2)),
        ValueError,
        r"order must be an integer >= 0; got order=-2",
    ),
    # Names: models, data sets, devices, dtypes, methods, solvers.
    "an unknown model": (
        lambda: eomlib.make_problem("vit"),
        ValueError,
        r"unknown model 'vit'; allowed: bn_cnn, bn_mlp, cnn, mlp",
    ),
    "an unknown data set": (
        lambda: eomlib.make_problem("mlp", "imagenet"),
        ValueError,
        r"unknown dataset 'imagenet'; allowed: cifar10, digits, mnist",
    ),
    "an unknown device": (
        lambda: eomlib.make_problem("mlp", device="tpu"),
        ValueError,
        r"unknown device 'tpu'; allowed: auto, cpu, cuda",
    ),
    "an unknown dtype": (
        lambda: eomlib.make_problem("mlp", dtype="float16"),
        ValueError,
        r"unknown dtype 'float16'; allowed: float32, float64",
    ),
    "an integer torch dtype": (
        lambda: eomlib.make_problem("mlp", dtype=torch.int32),
        ValueError,
        r"dtype must be floating point; got dtype=torch.int32",
    ),
    "an unknown field method": (
        lambda: eomlib.eom_field(_never, 0.1, 1, method="taylor"),
        ValueError,
        r"unknown method 'taylor'; allowed: autodiff, iterates",
    ),
    "an unknown solver": (
        lambda: eomlib.integrate(
            lambda p: -p, X, torch.tensor([0.0, 1.0]), solver="rk4"
        ),
        ValueError,
        r"unknown solver 'rk4'; allowed: adaptive_heun, bosh3, dopri5, dopri8",
    ),
    # Parameters that cannot be differentiated, and trees that do not match.
    "integer params to grad": (
        lambda: eomlib.grad(_never, INTEGERS),
        TypeError,
        r"params must be a floating-point tensor .* got dtype=torch.int64; "
        r"allowed: float32, float64",
    ),
    "an integer leaf to hvp": (
        lambda: eomlib.hvp(_never, {"w": X, "n": INTEGERS}, {"w": X, "n": X}),
        TypeError,
        r"params\['n'\] must be a floating-point tensor",
    ),
    "integer params to the counter terms": (
        lambda: eomlib.counter_terms(_never, INTEGERS, 2),
        TypeError,
        r"params must be a floating-point tensor",
    ),
    "integer params to the iterates field": (
        lambda: eomlib.eom_field(_never, 0.1, 2, method="iterates")(INTEGERS),
        TypeError,
        r"params must be a floating-point tensor",
    ),
    "a vector of another shape": (
        lambda: eomlib.hvp(_never, X, torch.zeros(3, dtype=torch.float64)),
        ValueError,
        r"params has shape \(2,\) but v has shape \(3,\)",
    ),
    "a vector with other keys": (
        lambda: eomlib.hvp(_never, {"w": X}, {"b": X}),
        ValueError,
        r"params and v have different keys: \['w'\] against \['b'\]",
    ),
    "a tensor where a dict is expected": (
        lambda: eomlib.grad_derivative(_never, {"w": X}, [X]),
        ValueError,
        r"params and vectors\[0\] must both be tensors or both be dicts of tensors",
    ),
    "a batch of vectors of another shape": (
        lambda: eomlib.batched_hvp(_never, X, torch.zeros(4, 3, dtype=X.dtype)),
        ValueError,
        r"params has shape \(2,\) but vectors\[0\] has shape \(3,\)",
    ),
    "params that do not name the model's parameters": (
        lambda: eomlib.make_problem("mlp", num_samples=5).loss({"0.weight": X}),
        KeyError,
        r"params must name exactly the model's parameters; missing \['0.bias'",
    ),
    "a tolerance float32 cannot resolve": (
        lambda: eomlib.eom_trajectory(
            _never, X.float(), 0.1, 3, 1, rtol=1e-10, atol=1e-12
        ),
        ValueError,
        r"rtol=1e-10 is below what float32 resolves .* use rtol >= 1e-06",
    ),
    # The optimizers beyond GD, and their chapters' parameters.
    "a momentum of 1": (
        lambda: eomlib.modified_field(_never, torch.optim.SGD, lr=0.1, momentum=1),
        ValueError,
        r"momentum must be in \[0, 1\); got momentum=1",
    ),
    "Adam's betas out of range": (
        lambda: eomlib.modified_field(_never, torch.optim.Adam, lr=0.1, betas=(0.9, 1)),
        ValueError,
        r"betas\[1\] must be in \[0, 1\); got betas\[1\]=1",
    ),
    "a batch size that does not divide the examples": (
        lambda: eomlib.check_parameters(num_samples=256, batch_size=7),
        ValueError,
        r"batch_size must divide the number of examples, 256, .* got batch_size=7",
    ),
    "lr * lambda_max past GD's edge": (
        lambda: eomlib.check_parameters(fractions=[0.5, 2.5]),
        ValueError,
        r"fractions\[1\] must be below 2, GD's stability edge",
    ),
    "a fraction of a bound that is not below 1": (
        lambda: eomlib.check_parameters(lr_fractions=[0.4, 1.2]),
        ValueError,
        r"lr_fractions\[1\] must be in \(0, 1\); got lr_fractions\[1\]=1.2",
    ),
    "no eigenpairs asked for": (
        lambda: eomlib.top_eigenpairs(_never, X, 0),
        ValueError,
        r"k must be an integer >= 1; got k=0",
    ),
}
if not torch.cuda.is_available():
    BAD_CALLS["device='cuda' without a GPU"] = (
        lambda: eomlib.make_problem("mlp", device="cuda"),
        ValueError,
        r"device='cuda' was asked for but this machine has no CUDA GPU visible to "
        r"torch; allowed here: 'auto' or 'cpu'",
    )


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_with_a_message_naming_it(case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()
