"""Values checked wherever they enter (issue 22): one rule for numbers and switches (gpunn.scalars), on
construction and on every later assignment, schedules' values where the learning rate is used, weights
assigned to a layer, the layer list, foreign array types, the scikit-learn estimators' parameters and
the GPUNN_FUSED switch. Each expectation is written here: the exact error class and the words it names,
or weights compared with a copy taken before."""
from __future__ import annotations

import fractions
import math

import numpy
import pytest

import gpunn
from gpunn import activations, bench, check, scalars, schedules
from gpunn.errors import ConfigError, DataError, DataTypeError, ShapeError
from gpunn.ops import XpOps, fused_enabled, ops_for
from helpers import host, rng

#: Values no number hyper-parameter may take, whatever its range.
NOT_NUMBERS = [True, False, numpy.bool_(True), "0.1", b"1", None, [0.1], (0.1,), numpy.array(0.1),
               numpy.array([0.1]), 1j, object()]
NOT_FINITE = [math.nan, math.inf, -math.inf, numpy.float32("nan"), numpy.float64("inf"), 10**400, -10**400]


# hyper-parameter -> (make an object with a valid value, a valid value to compare after a refusal)
def _sgd():
    return gpunn.SGD(lr=0.1, momentum=0.5, weight_decay=0.01)


def _cosine():
    return schedules.CosineDecay(0.5, total_steps=100, final=0.1)


HYPER = {
    "SGD.lr": (_sgd, "lr"), "SGD.momentum": (_sgd, "momentum"), "SGD.weight_decay": (_sgd, "weight_decay"),
    "Adam.lr": (gpunn.Adam, "lr"), "Adam.beta1": (gpunn.Adam, "beta1"), "Adam.beta2": (gpunn.Adam, "beta2"),
    "Adam.eps": (gpunn.Adam, "eps"), "Adam.weight_decay": (gpunn.Adam, "weight_decay"),
    "StepDecay.initial": (lambda: schedules.StepDecay(0.5), "initial"),
    "StepDecay.factor": (lambda: schedules.StepDecay(0.5), "factor"),
    "StepDecay.every": (lambda: schedules.StepDecay(0.5), "every"),
    "ExponentialDecay.initial": (lambda: schedules.ExponentialDecay(0.5), "initial"),
    "ExponentialDecay.rate": (lambda: schedules.ExponentialDecay(0.5), "rate"),
    "ExponentialDecay.every": (lambda: schedules.ExponentialDecay(0.5), "every"),
    "CosineDecay.initial": (_cosine, "initial"), "CosineDecay.total_steps": (_cosine, "total_steps"),
    "CosineDecay.final": (_cosine, "final"),
    "LeakyReLU.alpha": (activations.LeakyReLU, "alpha"), "ELU.a": (activations.ELU, "a"),
}
#: Out-of-range values of each (beyond the type and finiteness rules).
OUT_OF_RANGE = {
    "SGD.lr": [0, -0.1], "SGD.momentum": [1.0, 1.5, -0.1], "SGD.weight_decay": [-1e-3],
    "Adam.lr": [0.0, -1], "Adam.beta1": [1, -0.5], "Adam.beta2": [1.0], "Adam.eps": [0, -1e-8],
    "Adam.weight_decay": [-1],
    "StepDecay.initial": [0, -1], "StepDecay.factor": [0, 1.5], "StepDecay.every": [0, -3, 2.5],
    "ExponentialDecay.initial": [-0.5], "ExponentialDecay.rate": [0.0, 2], "ExponentialDecay.every": [0, 1.0],
    "CosineDecay.initial": [0, 0.05], "CosineDecay.total_steps": [0, 10.0], "CosineDecay.final": [-0.1, 0.6],
    "LeakyReLU.alpha": [-0.1, 1.0], "ELU.a": [0, -1],
}


def _bad_values(key):
    return NOT_NUMBERS + NOT_FINITE + OUT_OF_RANGE[key]


@pytest.mark.parametrize("key", sorted(HYPER))
def test_every_hyper_parameter_refuses_bad_values_on_assignment_and_keeps_its_value(key):
    make, attr = HYPER[key]
    for bad in _bad_values(key):
        obj = make()
        before = getattr(obj, attr)
        with pytest.raises(ConfigError, match=attr if attr not in ("alpha", "a") else "alpha|parameter a"):
            setattr(obj, attr, bad)
        assert getattr(obj, attr) == before, (key, bad)


CONSTRUCTORS = {
    "SGD.lr": lambda v: gpunn.SGD(lr=v), "SGD.momentum": lambda v: gpunn.SGD(momentum=v),
    "SGD.weight_decay": lambda v: gpunn.SGD(weight_decay=v), "Adam.lr": lambda v: gpunn.Adam(lr=v),
    "Adam.beta1": lambda v: gpunn.Adam(betas=(v, 0.999)), "Adam.beta2": lambda v: gpunn.Adam(betas=(0.9, v)),
    "Adam.eps": lambda v: gpunn.Adam(eps=v), "Adam.weight_decay": lambda v: gpunn.Adam(weight_decay=v),
    "StepDecay.initial": lambda v: schedules.StepDecay(v), "StepDecay.factor": lambda v: schedules.StepDecay(1, v),
    "StepDecay.every": lambda v: schedules.StepDecay(1, every=v),
    "ExponentialDecay.initial": lambda v: schedules.ExponentialDecay(v),
    "ExponentialDecay.rate": lambda v: schedules.ExponentialDecay(1, v),
    "ExponentialDecay.every": lambda v: schedules.ExponentialDecay(1, every=v),
    "CosineDecay.initial": lambda v: schedules.CosineDecay(v, 10, final=0.1),
    "CosineDecay.total_steps": lambda v: schedules.CosineDecay(1, v),
    "CosineDecay.final": lambda v: schedules.CosineDecay(0.5, 10, final=v),
    "LeakyReLU.alpha": lambda v: activations.LeakyReLU(v), "ELU.a": lambda v: activations.ELU(v),
}


@pytest.mark.parametrize("key", sorted(CONSTRUCTORS))
def test_every_constructor_refuses_the_same_values(key):
    for bad in _bad_values(key):
        with pytest.raises(ConfigError):
            CONSTRUCTORS[key](bad)


@pytest.mark.parametrize("value", [numpy.float32(0.25), numpy.float64(0.25), fractions.Fraction(1, 4)])
def test_numpy_and_other_real_numbers_are_numbers_everywhere(value):
    assert gpunn.SGD(lr=value, momentum=value).momentum == 0.25
    assert gpunn.Adam(lr=value, betas=(value, value), eps=value).beta2 == 0.25
    assert schedules.StepDecay(value, factor=value, every=numpy.int64(3))(3) == 0.0625
    assert schedules.ExponentialDecay(value, rate=value, every=numpy.int32(1)).every == 1
    assert schedules.CosineDecay(value, numpy.int16(10), final=value)(5) == 0.25
    assert activations.LeakyReLU(value).alpha == 0.25 and activations.ELU(value).param == 0.25
    assert gpunn.Dense(numpy.int64(3), numpy.int8(2)).n_out == 2
    # the values are stored as Python numbers, so configs stay JSON and float32 stays float32 (NEP 50)
    assert type(schedules.StepDecay(value, every=numpy.int64(3)).config()["every"]) is int
    assert type(gpunn.SGD(lr=value).lr) is float


@pytest.mark.parametrize("bad", [1, 0, "no", "False", None, numpy.array(True), 1.0])
def test_switches_must_be_real_bools(bad):
    with pytest.raises(ConfigError, match="nesterov must be True or False"):
        gpunn.SGD(lr=0.1, momentum=0.9, nesterov=bad)
    net = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu")
    with pytest.raises(ConfigError, match="shuffle"):
        net.fit(numpy.zeros((4, 2)), numpy.zeros((4, 1)), epochs=1, shuffle=bad)
    if bad is not None:                   # fused=None means "GPUNN_FUSED's choice"
        with pytest.raises(ConfigError, match="fused"):
            gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", fused=bad)
    assert gpunn.SGD(lr=0.1, momentum=0.9, nesterov=numpy.bool_(True)).nesterov is True


def test_adam_betas_are_assigned_as_a_checked_pair():
    opt = gpunn.Adam()
    for bad in [(0.9, 1.0), (0.9,), 0.9, "ab", (True, 0.9), (0.9, math.nan)]:
        with pytest.raises(ConfigError, match="beta"):
            opt.betas = bad
        assert opt.betas == (0.9, 0.999)
    opt.betas = [numpy.float32(0.5), 0.25]
    assert opt.betas == (0.5, 0.25) and opt.config()["betas"] == [0.5, 0.25]


def test_moving_a_network_checks_fused_before_changing_anything():
    net = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu")
    fused, ops = net.fused, net.ops           # the CPU's fused kernels run where numba is installed
    with pytest.raises(ConfigError, match="fused must be True or False"):
        net.to("cpu", fused="no")
    assert net.device == gpunn.get_device("cpu") and net.fused is fused and net.ops is ops


def test_nesterov_and_momentum_are_checked_together_on_assignment():
    opt = gpunn.SGD(lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0"):
        opt.momentum = 0.0
    assert opt.momentum == 0.9
    opt.nesterov = False
    opt.momentum = 0.0
    with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0") as refused:
        opt.nesterov = True
    assert "set nesterov = False first" not in str(refused.value)      # the hint is for a momentum assigned
    opt = gpunn.SGD(lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ConfigError, match=r"needs momentum > 0 \(set nesterov = False first\)"):
        opt.momentum = 0.0


def test_nesterov_is_refused_while_a_subclass_leaves_momentum_unset():
    """A setting a subclass leaves unset is off (gpunn.optim._hyper): momentum unset is momentum 0."""
    class Unset(gpunn.SGD):
        name = "test_values.unset_momentum"

        def __init__(self):
            gpunn.optim.Optimizer.__init__(self)

    with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0"):
        Unset().nesterov = True


def test_nesterov_is_accepted_with_a_subclass_s_momentum_property():
    class Momentum(gpunn.SGD):
        name = "test_values.momentum_property"
        momentum = property(lambda self: 0.9)

        def __init__(self):
            gpunn.optim.Optimizer.__init__(self)

    opt = Momentum()
    opt.nesterov = True
    assert opt.nesterov is True


def test_nesterov_is_refused_where_momentum_is_unset_or_zero_however_it_is_given():
    """A subclass that leaves μ unset (None, read as 0 by the update) or gives 0 as a property is refused
    nesterov=True, as SGD(momentum=0, nesterov=True) is; switching μ to 0 with nesterov on is refused."""
    class Unset(gpunn.SGD):
        name = "test_values.momentum_unset"

        def __init__(self):
            gpunn.optim.Optimizer.__init__(self)

    class Zero(Unset):
        name = "test_values.momentum_zero_property"
        momentum = property(lambda self: 0.0)

    for cls in (Unset, Zero):
        with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0$"):
            cls().nesterov = True
    with pytest.raises(ConfigError, match="needs momentum"):
        gpunn.SGD(momentum=0.0, nesterov=True)
    opt = gpunn.SGD(momentum=0.9, nesterov=True)
    with pytest.raises(ConfigError, match=r"set nesterov = False first"):
        opt.momentum = 0.0


def test_momentum_switched_on_between_steps_starts_from_zero_velocity():
    """w1 = w0 − η g1 (no momentum); then v = g2 (fresh velocity), w2 = w1 − η g2; then v = μ g2 + g3."""
    g = rng(3)
    w0, g1, g2, g3 = (g.normal(size=50) for _ in range(4))
    opt = gpunn.SGD(lr=0.1)
    ops = XpOps(gpunn.get_device("cpu"))
    w = w0.copy()
    opt.update(w, g1.copy(), None, ops)
    opt.momentum = 0.5
    opt.update(w, g2.copy(), None, ops)
    opt.update(w, g3.copy(), None, ops)
    expected = w0 - 0.1 * g1 - 0.1 * g2 - 0.1 * (0.5 * g2 + g3)
    numpy.testing.assert_allclose(w, expected, rtol=1e-12)


def test_large_integers_are_a_config_error_not_an_overflow_error():
    for make in (lambda: gpunn.SGD(lr=10**400), lambda: gpunn.Adam(eps=10**400),
                 lambda: schedules.StepDecay(10**400), lambda: activations.ELU(10**400)):
        with pytest.raises(ConfigError, match="too large"):
            make()
    with pytest.raises(ConfigError, match="positive integer"):   # an int with 10,000 digits is shown, cut
        gpunn.Dense(-10**10000, 2)


# -- schedules' values, checked where the learning rate is used ---------------------------------------
class Returns(schedules.Schedule):
    """A custom schedule returning ``value`` from step ``at`` on, 0.1 before."""

    name = "returns"

    def __init__(self, value, at=0):
        self.value, self.at = value, at

    def __call__(self, step):
        return self.value if step >= self.at else 0.1


def _data():
    g = rng(5)
    return g.normal(size=(16, 3)), g.normal(size=(16, 2))


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, None, "0.1", numpy.array(0.1), numpy.array([0.1]),
                                   True, 10**400, 1j], ids=lambda v: scalars.shown(v)[:12])
def test_a_schedule_returning_a_bad_value_stops_the_step_naming_schedule_and_step(value):
    X, Y = _data()
    net = gpunn.Sequential([gpunn.Dense(3, 2, "identity")], device="cpu", dtype="float64", seed=1)
    before = host(net.flat_parameters())
    with pytest.raises(ConfigError, match=r"schedule Returns\(.* returned .* at step 3;"):
        net.fit(X, Y, optimizer=gpunn.SGD(lr=Returns(value, at=3)), epochs=2, batch_size=4)
    # fit leaves the weights of the epoch's start (epoch 1 here) after any error but divergence
    numpy.testing.assert_array_equal(host(net.flat_parameters()), before)


def test_a_schedule_may_return_numpy_floats_and_zero():
    """The same weights as the same constant learning rates, replayed with train_step."""
    X, Y = _data()
    a = gpunn.Sequential([gpunn.Dense(3, 2, "identity")], device="cpu", dtype="float64", seed=1)
    b = gpunn.Sequential([gpunn.Dense(3, 2, "identity")], device="cpu", dtype="float64", seed=1)
    a.fit(X, Y, optimizer=gpunn.SGD(lr=Returns(numpy.float32(0.0), at=2)), epochs=1, batch_size=4, shuffle=False)
    opt = gpunn.SGD(lr=0.1)
    for k in range(2):                    # steps 2 and 3 have η = 0: plain SGD then changes nothing
        b.train_step(X[4 * k:4 * k + 4], Y[4 * k:4 * k + 4], "squared_error", opt)
    numpy.testing.assert_allclose(host(a.flat_parameters()), host(b.flat_parameters()), rtol=1e-12)


def test_a_learning_rate_set_in_a_callback_is_checked():
    X, Y = _data()
    net = gpunn.Sequential([gpunn.Dense(3, 2, "identity")], device="cpu", seed=1)
    opt = gpunn.SGD(lr=0.1)

    def lower(record):
        opt.lr = -0.1

    with pytest.raises(ConfigError, match="lr must be a positive finite number; got -0.1"):
        net.fit(X, Y, optimizer=opt, epochs=3, callbacks=[gpunn.callbacks.LambdaCallback(lower)])
    assert opt.lr == 0.1 and len(net.history) == 1


# -- weights, layers, arrays ---------------------------------------------------------------------------
@pytest.mark.parametrize("attr,value,error", [
    ("W", numpy.full((3, 2), numpy.nan), DataError), ("W", numpy.full((3, 2), numpy.inf), DataError),
    ("b", [0.0, numpy.nan], DataError), ("b", numpy.nan, ShapeError), ("W", numpy.zeros((2, 3)), ShapeError),
    ("W", numpy.zeros(6), ShapeError), ("b", numpy.zeros((1, 2)), ShapeError), ("b", ["a", "b"], DataTypeError),
    ("W", None, DataError),
])
def test_assigned_weights_are_checked_and_refusals_change_nothing(attr, value, error):
    net = gpunn.Sequential([gpunn.Dense(3, 2)], device="cpu", seed=0)
    before = host(net.flat_parameters())
    with pytest.raises(error):
        setattr(net.layers[0], attr, value)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), before)
    net.layers[0].b = [1.5, -2.0]
    assert host(net.layers[0].b).tolist() == [1.5, -2.0]


@pytest.mark.parametrize("layers", [None, 5, 2.5, "dense", b"x", {"a": 1}, set(), gpunn.Dense(2, 1), object()])
def test_the_layer_list_must_be_a_list_of_dense(layers):
    with pytest.raises(ConfigError, match="layers must be a list"):
        gpunn.Sequential(layers, device="cpu")


def test_layers_may_come_as_a_tuple_or_a_generator():
    assert len(gpunn.Sequential((gpunn.Dense(2, 3), gpunn.Dense(3, 1)), device="cpu").layers) == 2
    assert len(gpunn.Sequential((gpunn.Dense(n, 1) for n in [2]), device="cpu").layers) == 1


class RequiresGrad:
    """Behaves as a PyTorch tensor with requires_grad=True does under numpy.asarray."""

    shape = (4, 2)

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")


class Sparse:
    """A scipy.sparse-like matrix: numpy.asarray makes a 0-d object array of it."""

    def toarray(self):  # pragma: no cover - never called by gpunn
        return numpy.zeros((4, 2))


class Convertible:
    """A foreign CPU array type that converts cleanly (as a detached tensor, pandas, xarray do)."""

    def __array__(self, dtype=None, copy=None):
        return numpy.arange(8.0).reshape(4, 2)


def test_foreign_array_types_convert_cleanly_or_are_a_data_type_error():
    net = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", dtype="float64", seed=0)
    Y = numpy.zeros((4, 1))
    for call in (lambda x: net.predict(x), lambda x: net.fit(x, Y, epochs=1), lambda x: net.evaluate(x, Y),
                 lambda x: net.fit(numpy.zeros((4, 2)), x, epochs=1)):
        with pytest.raises(DataTypeError, match=r"detach\(\)"):
            call(RequiresGrad())
        with pytest.raises(DataTypeError, match=r"toarray\(\)"):
            call(Sparse())
    masked = numpy.ma.masked_array(numpy.zeros((4, 2)), mask=[[0, 1], [0, 0], [0, 0], [0, 0]])
    with pytest.raises(DataTypeError, match="masked"):
        net.predict(masked)
    expected = host(net.predict(numpy.arange(8.0).reshape(4, 2)))
    numpy.testing.assert_array_equal(host(net.predict(Convertible())), expected)
    with pytest.raises(DataTypeError, match=r"detach\(\)"):
        net.layers[0].W = RequiresGrad()


# -- switches from text -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("1", True), ("true", True), (" Yes ", True), ("ON", True),
                                           ("0", False), ("false", False), ("no", False), ("Off", False),
                                           ("", True), ("  ", True)])
def test_gpunn_fused_reads_the_usual_switch_words(monkeypatch, text, expected):
    monkeypatch.setenv("GPUNN_FUSED", text)
    assert fused_enabled() is expected


@pytest.mark.parametrize("text", ["maybe", "2", "-1", "tru", "yes please", "none"])
def test_gpunn_fused_refuses_other_values_on_every_device(monkeypatch, text):
    monkeypatch.setenv("GPUNN_FUSED", text)
    with pytest.raises(ConfigError, match=r"GPUNN_FUSED must be one of 1/true/yes/on or 0/false/no/off"):
        gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu")
    with pytest.raises(ConfigError, match="GPUNN_FUSED"):
        ops_for(gpunn.get_device("cpu"))


def test_one_parser_for_text_switches():
    assert [scalars.parse_flag("x", w) for w in ("1", "TRUE", "no")] == [True, True, False]
    with pytest.raises(ConfigError, match="--thing must be one of"):
        scalars.parse_flag("--thing", "maybe")


# -- the scikit-learn estimators -----------------------------------------------------------------------
@pytest.mark.parametrize("param,value", [
    ("tol", math.nan), ("tol", -1e-4), ("tol", math.inf), ("tol", "0.1"), ("alpha", -1.0), ("alpha", 10**400),
    ("learning_rate_init", 0.0), ("learning_rate_init", math.nan), ("epsilon", 0.0), ("momentum", 1.5),
    ("beta_1", 1.0), ("beta_2", -0.1), ("validation_fraction", 0.0), ("validation_fraction", math.nan),
    ("max_iter", 0), ("max_iter", 2.5), ("max_iter", True), ("n_iter_no_change", 0), ("batch_size", 0),
    ("batch_size", True), ("batch_size", "big"), ("shuffle", "no"), ("nesterovs_momentum", 1),
    ("early_stopping", "yes"), ("verbose", -1), ("verbose", "loud"), ("hidden_layer_sizes", (True,)),
    ("hidden_layer_sizes", None), ("hidden_layer_sizes", (4, 0)), ("hidden_layer_sizes", "10"),
    ("activation", ["relu"]), ("activation", None), ("dtype", "foo"), ("dtype", "float16"),
])
def test_the_estimators_check_every_hyper_parameter(param, value):
    pytest.importorskip("sklearn")
    from gpunn.sklearn import MLPClassifier, MLPRegressor
    X, y = numpy.zeros((6, 2)), numpy.array([0, 1, 0, 1, 0, 1])
    for est in (MLPClassifier(max_iter=2), MLPRegressor(max_iter=2)):
        est.set_params(**{param: value})
        with pytest.raises(ValueError, match=param):     # scikit-learn's InvalidParameterError, or a ConfigError
            est.fit(X, y)


@pytest.mark.parametrize("call", [
    lambda: gpunn.datasets.two_moons(n=True), lambda: gpunn.datasets.two_moons(noise=math.nan),
    lambda: gpunn.datasets.two_spirals(n=10.0), lambda: gpunn.datasets.two_spirals(noise=-1),
    lambda: gpunn.datasets.two_moons(seed="1"), lambda: gpunn.datasets.standardize(numpy.ones((3, 2)), eps=math.inf),
    lambda: gpunn.datasets.train_test_split(numpy.ones((10, 2)), numpy.ones(10), test_size=math.nan),
    lambda: gpunn.datasets.train_test_split(numpy.ones((10, 2)), numpy.ones(10), test_size=True),
])
def test_the_data_helpers_follow_the_same_rule(call):
    with pytest.raises(ConfigError):
        call()
    assert gpunn.datasets.two_moons(n=numpy.int64(10), noise=numpy.float32(0.0))[0].shape == (10, 2)


@pytest.mark.parametrize("call,match", [
    (lambda: bench.time_workload("lecture", "cpu", "float32", 8, min_time=math.nan), "min_time"),
    (lambda: bench.time_workload("lecture", "cpu", "float32", 8, min_time=math.inf), "min_time"),
    (lambda: bench.time_workload("lecture", "cpu", "float32", 8, repeats=0), "repeats"),
    (lambda: check.run_check(["cpu"], ["float32"], steps=2.5), "steps"),
    (lambda: gpunn.datasets.load_digits(scaled="no"), "scaled"),
])
def test_the_tools_behind_the_commands_follow_the_same_rule(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize("attr,value", [("n_in", 5), ("n_out", 1), ("activation", "relu"),
                                        ("activation", activations.Tanh()), ("init", "he")])
def test_a_layers_shape_and_activation_are_fixed_once_made(attr, value):
    net = gpunn.Sequential([gpunn.Dense(3, 2, "sigmoid")], device="cpu", seed=0)
    layer = net.layers[0]
    before = (layer.n_in, layer.n_out, layer.activation, layer.init)
    with pytest.raises(ConfigError, match=f"{attr} is fixed"):
        setattr(layer, attr, value)
    assert (layer.n_in, layer.n_out, layer.activation, layer.init) == before
    assert net.predict(numpy.zeros((1, 3))).shape == (1, 2)


def test_seeds_may_be_any_non_negative_integer_counts_at_most_2_63():
    assert gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", seed=2**127).seed == 2**127
    assert gpunn.datasets.two_moons(n=4, seed=numpy.uint64(2**64 - 1))[0].shape == (4, 2)
    for bad in (-1, True, 1.0, "3"):
        with pytest.raises(ConfigError, match="seed"):
            gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", seed=bad)
    with pytest.raises(ConfigError, match="too large"):
        gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu").fit(numpy.zeros((2, 2)), numpy.zeros((2, 1)),
                                                                 epochs=2**63)


@pytest.mark.parametrize("value", [True, math.nan, math.inf, 0, -1, "5", numpy.array(5.0)],
                         ids=lambda v: scalars.shown(v)[:12])
def test_the_collective_timeout_follows_the_same_rule(value, monkeypatch):
    from gpunn import distributed
    with pytest.raises(ConfigError, match="collective timeout"):
        distributed.Communicator(timeout=value)
    for text in ("nan", "inf", "-3", "0"):
        monkeypatch.setenv("GPUNN_COLLECTIVE_TIMEOUT", text)
        with pytest.raises(ConfigError, match="collective timeout|GPUNN_COLLECTIVE_TIMEOUT"):
            distributed.Communicator()
    monkeypatch.setenv("GPUNN_COLLECTIVE_TIMEOUT", "2.5")
    assert distributed.Communicator(timeout=numpy.float32(4.0)).rank == 0
