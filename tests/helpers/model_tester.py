"""One tester for every model class, in the manner of diffusers' ``ModelTesterMixin``.

A model class is one ``ModelCase`` row: how to build it (tiny config, from torch's global RNG), its
inputs for a batch, the methods to call and the per-sample shape of each output. Every check in
``MODEL_CHECKS`` runs on every row, so a test module needs only its table and::

    @pytest.mark.parametrize("check", MODEL_CHECKS, ids=check_id)
    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_model_class(case, check, tmp_path):
        check(case, tmp_path)

Outputs are flattened to ``{"method": tensor}`` or ``{"method.field": tensor}`` (a dataclass, a mapping
such as diffusers' ``BaseOutput``, or a tuple gives one entry per tensor; None fields are left out), so
a tensor, a ``DetectorOutput`` and a ``BackboneOutput`` are checked alike. Imports torch and safetensors
only: every test group can use it whatever the stage's extras.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

BATCH = 2
"""Batch size of the full batch; the batch of one is its last row."""
INPUT_SEED = 1234
SEEDS = (0, 1)
"""Two seeds for the model's initial weights: the same seed must give the same model, another a different one."""
ROW_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
"""Batch of one vs its row in the batch: kernels may sum in another order for another batch size."""


@dataclass(frozen=True)
class ModelCase:
    """One model class under test."""

    name: str
    """The test id."""
    build: Callable[[], nn.Module]
    """A freshly initialised model in a tiny config; called right after ``torch.manual_seed``."""
    inputs: Callable[[int, torch.Generator], dict[str, Tensor | None]]
    """(batch, generator) -> keyword inputs, each with the batch as its first dimension (or None)."""
    output_shapes: Mapping[str, tuple[int, ...]]
    """Flattened output name -> its shape without the batch dimension; exactly these outputs must appear."""
    methods: tuple[str, ...] = ("forward",)
    """Methods to call with the inputs (``forward`` through ``__call__``, so hooks run as in use)."""


def case_id(case: ModelCase) -> str:
    return case.name


def check_id(check: Callable) -> str:
    return check.__name__.removeprefix("check_")


# ---- running a case -------------------------------------------------------------------------------
def build_seeded(case: ModelCase, seed: int) -> nn.Module:
    """The case's model with initial weights from ``seed``, in eval mode; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return case.build().eval()


def batch_inputs(case: ModelCase, batch: int = BATCH) -> dict[str, Tensor | None]:
    """The same inputs on every call (their own generator; the global RNG is not drawn from)."""
    return case.inputs(batch, torch.Generator().manual_seed(INPUT_SEED))


def flatten(prefix: str, value: object) -> dict[str, Tensor]:
    """Every tensor in ``value`` by a dotted name under ``prefix``."""
    if value is None:
        return {}
    if isinstance(value, Tensor):
        return {prefix: value}
    if dataclasses.is_dataclass(value) and not isinstance(value, Mapping):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        raise TypeError(f"{prefix}: cannot read tensors out of a {type(value).__name__}")
    return {name: t for key, item in items for name, t in flatten(f"{prefix}.{key}", item).items()}


@torch.no_grad()
def run_model(case: ModelCase, model: nn.Module, inputs: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """Every flattened output of every method of the case, on ``inputs``."""
    outputs: dict[str, Tensor] = {}
    for method in case.methods:
        call = model if method == "forward" else getattr(model, method)
        outputs.update(flatten(method, call(**inputs)))
    return outputs


def assert_same_tensors(left: Mapping[str, Tensor], right: Mapping[str, Tensor], what: str) -> None:
    """Equal names, dtypes, shapes and values, bit for bit."""
    assert sorted(left) == sorted(right), what
    for name in left:
        assert left[name].dtype == right[name].dtype, f"{what}: {name} dtype"
        assert torch.equal(left[name], right[name]), f"{what}: {name} differs"


def differing(left: Mapping[str, Tensor], right: Mapping[str, Tensor]) -> list[str]:
    return [name for name in left if left[name].shape != right[name].shape or not torch.equal(left[name], right[name])]


# ---- the checks -----------------------------------------------------------------------------------
def check_output_shapes(case: ModelCase, tmp_path: Path) -> None:
    """A batch of 2 and a batch of 1 give exactly the declared outputs, batch first, finite."""
    model = build_seeded(case, SEEDS[0])
    for batch in (BATCH, 1):
        outputs = run_model(case, model, batch_inputs(case, batch))
        shapes = {name: tuple(t.shape) for name, t in outputs.items()}
        assert shapes == {name: (batch, *shape) for name, shape in case.output_shapes.items()}, f"batch {batch}"
        for name, t in outputs.items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{name}: not finite at batch {batch}"


def check_batch_of_one_matches_its_row(case: ModelCase, tmp_path: Path) -> None:
    """In eval mode a sample's outputs do not depend on the rest of its batch."""
    model = build_seeded(case, SEEDS[0])
    inputs = batch_inputs(case)
    full = run_model(case, model, inputs)
    last_row = run_model(case, model, {k: None if v is None else v[-1:] for k, v in inputs.items()})
    assert sorted(last_row) == sorted(full)
    for name, t in last_row.items():
        row = full[name][-1:]
        assert t.shape == row.shape and t.dtype == row.dtype, name
        if not t.is_floating_point():
            assert torch.equal(t, row), name
        else:  # torch.isclose, not torch.testing.assert_close: its first call costs seconds of imports
            assert torch.isclose(t, row, **ROW_TOLERANCE).all(), f"{name}: off by up to {(t - row).abs().max():.3g}"


def check_safetensors_round_trip(case: ModelCase, tmp_path: Path) -> None:
    """``save_file(state_dict)`` then ``load_file`` into a model of other weights gives identical outputs."""
    saved, other = build_seeded(case, SEEDS[0]), build_seeded(case, SEEDS[1])
    inputs = batch_inputs(case)
    expected = run_model(case, saved, inputs)
    assert differing(run_model(case, other, inputs), expected), "other weights give the same outputs: nothing to load"
    path = tmp_path / f"{case.name}.safetensors"
    save_file(saved.state_dict(), str(path))
    loaded = load_file(str(path))
    assert_same_tensors(loaded, saved.state_dict(), "state dict read back")
    other.load_state_dict(loaded, strict=True)
    assert_same_tensors(run_model(case, other, inputs), expected, "outputs after loading")


def check_same_seed_same_model(case: ModelCase, tmp_path: Path) -> None:
    """The same seed gives the same weights and outputs; another seed other weights."""
    first, again, other = (build_seeded(case, seed) for seed in (SEEDS[0], SEEDS[0], SEEDS[1]))
    assert_same_tensors(first.state_dict(), again.state_dict(), "weights from the same seed")
    assert differing(first.state_dict(), other.state_dict()), "another seed gave the same weights"
    inputs = batch_inputs(case)
    assert_same_tensors(run_model(case, first, inputs), run_model(case, again, inputs), "outputs from the same seed")


def check_eval_mode_has_no_randomness(case: ModelCase, tmp_path: Path) -> None:
    """In eval mode outputs do not follow the global RNG, and a forward pass leaves the state dict alone
    (no running statistics or power-iteration vectors move)."""
    model = build_seeded(case, SEEDS[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = batch_inputs(case)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        first = run_model(case, model, inputs)
        torch.manual_seed(2)
        second = run_model(case, model, inputs)
    assert_same_tensors(second, first, "two eval passes under other global seeds")
    assert_same_tensors(model.state_dict(), before, "state dict after eval passes")


MODEL_CHECKS = (
    check_output_shapes,
    check_batch_of_one_matches_its_row,
    check_safetensors_round_trip,
    check_same_seed_same_model,
    check_eval_mode_has_no_randomness,
)
