"""AIMET's automatic mixed precision as an arm of the comparison: the peer itself, run, not re-implemented.

Qualcomm's AIMET (``aimet-torch`` 2.x, ``choose_mixed_precision``) picks one weight width per layer in
two phases: phase 1 lowers each quantizer group alone to each candidate and measures the accuracy
(the sensitivity list, least sensitive first); phase 2 lowers the groups cumulatively in that order,
each prefix one point of its Pareto front of accuracy against BitOPs. AIMET then stops where an
allowed accuracy drop is crossed; a comparison at a fixed budget instead needs the point where the
*budget* is met, so this arm asks AIMET for its whole front (brute-force phase 2, no accuracy drop)
and takes the front's point with the most bits that keeps every budget (average weight bits, and
BitOPs and bytes where the target gives them), counted by this package's own accounting like every
other arm's plan. What the per-layer point leaves of the budget is spent channel by channel on the
layers whose next width AIMET's phase 1 found the most sensitive (as ``sensitivity`` and ``hawq``
spend theirs), so the arm spends the same budget as the others.

AIMET sees the float model (BatchNorm folded, AIMET's per-channel default configuration, its own
calibration on the evaluator's training images) and scores with the evaluator's validation images,
the same ones every search uses. The plan it yields is evaluated once, like every other allocator's.
AIMET's quantization simulator refuses activations below 4 bits, so at A2 and A3 its two phases measure
with 4-bit activations (``AIMET_MIN_ACT_BITS``; the record's ``aimet_act_bits``): its sensitivities and
front are then those of a milder activation grid than the point's, and only its weight widths carry
over; the plan is evaluated, like every arm's, at the point's activation bits.
AIMET is an optional dependency (``pip install -r benchmarks/requirements-peers.txt``); without it this arm says so.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .baselines import spend_by_sensitivity
from .budgets import extra_budgets, within
from .evaluator import SearchEvaluator
from .hawq import float_twin
from .search import AllocationResult, SearchLog
from .space import AllocationError, ChannelSpace, Target, candidate_widths

INSTALL_HINT = "pip install -r benchmarks/requirements-peers.txt (aimet-torch 2.42)"
AIMET_MIN_ACT_BITS = 4  # aimet-torch 2.42: "Activation bitwidth must be between 4 and 32"


def aimet_available() -> bool:
    """Whether ``aimet_torch`` can be imported here (it is an optional dependency)."""
    return importlib.util.find_spec("aimet_torch") is not None


@dataclass(frozen=True)
class Flip:
    """One entry of AIMET's phase-1 list: the layers of a quantizer group lowered to ``bits``, and the
    accuracy measured with only that group lowered."""
    layers: tuple[str, ...]
    bits: int
    accuracy: float


@dataclass(frozen=True)
class FrontPoint:
    """One point of AIMET's phase-2 front: the first ``flips`` entries applied; AIMET's relative BitOPs
    and its accuracy."""
    flips: int
    relative_bitops: float
    accuracy: float


def prefix_plans(space: ChannelSpace, flips: list[Flip], start: int) -> list[torch.Tensor]:
    """Per-channel bits of every front point: all layers at ``start``, then the flips applied in order
    (a later flip of the same group overrides an earlier one, as AIMET sets them). Layers AIMET lowers
    that the plan does not set (kept in full precision here) are ignored; a layer of the plan that no
    flip names stays at ``start``."""
    bits = space.uniform(start)
    plans = []
    for flip in flips:
        bits = bits.clone()
        for name in flip.layers:
            if name in space.names:
                bits[space.layer_slice(name)] = flip.bits
        plans.append(bits)
    return plans


def choose_front_point(space: ChannelSpace, plans: list[torch.Tensor], limit: float, extra=()) -> int | None:
    """Index of the front point with the most average bits that keeps every budget (``None``: none does)."""
    best = None
    for index, bits in enumerate(plans):
        if space.average(bits) <= limit + 1e-9 and within(list(extra), bits):
            if best is None or space.average(bits) > space.average(plans[best]) + 1e-12:
                best = index
    return best


def loss_rise_table(space: ChannelSpace, flips: list[Flip], reference_accuracy: float, widths: list[int]) -> dict[tuple[int, int], float]:
    """Phase 1 as a rise table (accuracy lost per layer and width, 0 at the top width) for spending
    the rest of the budget; a width phase 1 did not measure takes the next higher width's loss."""
    measured = {}
    for flip in flips:
        for name in flip.layers:
            if name in space.names:
                measured[space.names.index(name), flip.bits] = reference_accuracy - flip.accuracy
    rise = {}
    for i in range(len(space.names)):
        for b in sorted(widths, reverse=True):
            rise[i, b] = measured.get((i, b), rise.get((i, b + 1), 0.0))
    return rise


def _split_input_norm(model: nn.Module):
    """The model without its input normalization (AIMET's tracer cannot follow its range check) and the
    normalization, to apply to images outside: the same function, a graph AIMET can prepare."""
    norm = getattr(model, "input_norm", None)
    if norm is None:
        return model, (lambda x: x)
    model = copy.copy(model)
    model.input_norm = nn.Identity()
    return model, norm


def run_aimet(evaluator: SearchEvaluator, act_bits: int, widths: list[int], results_dir: Path) -> tuple[list[Flip], list[FrontPoint], float]:
    """AIMET's phase-1 flips (in its order), its full phase-2 front, and its accuracy with every group at
    the top width, on the evaluator's float model and images.

    AIMET's algorithm object is driven directly rather than through ``choose_mixed_precision``: that
    wrapper makes the candidate with the best measured accuracy the baseline, which on a noisy
    validation subset can be a middle width (its phase 1 then lists flips *up*); the comparison's
    reference is the top width, given to AIMET's own ``set_baseline``."""
    try:
        import aimet_torch
        from aimet_torch._base.amp.mixed_precision_algo import GreedyMixedPrecisionAlgo
        from aimet_torch.amp.utils import _mock_v1_quantizers
        from aimet_torch.batch_norm_fold import fold_all_batch_norms
        from aimet_torch.common.amp.utils import AMPSearchAlgo
        from aimet_torch.common.defs import QuantizationDataType, QuantScheme
        from aimet_torch.common.utils import CallbackFunc
        from aimet_torch.model_preparer import prepare_model
        from aimet_torch.quantsim import QuantizationSimModel
    except ImportError as error:
        raise AllocationError(f"the aimet allocator needs AIMET: {INSTALL_HINT} ({error})") from error
    twin, _ = float_twin(evaluator)
    twin = twin.cpu().eval()
    body, norm = _split_input_norm(twin)
    with torch.no_grad():
        val = [(norm(x.cpu().float()), y.cpu()) for x, y in evaluator.batches]
        calibration = [norm(x.cpu().float()) for x, _ in (evaluator.bn_batches or evaluator.batches)]
    prepared = prepare_model(body)
    dummy = val[0][0][:1]
    fold_all_batch_norms(prepared, input_shapes=tuple(dummy.shape), dummy_input=dummy)
    config = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    sim = QuantizationSimModel(prepared, dummy_input=dummy, quant_scheme=QuantScheme.post_training_tf_enhanced,
                               default_output_bw=act_bits, default_param_bw=max(widths), config_file=str(config))

    @torch.no_grad()
    def calibrate(model: nn.Module, _=None) -> None:
        model.eval()
        for images in calibration:
            model(images)

    @torch.no_grad()
    def accuracy(model: nn.Module, _=None) -> float:
        model.eval()
        right = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in val)
        return right / sum(len(labels) for _, labels in val)

    sim.compute_encodings(calibrate, None)
    baseline = accuracy(sim.model)  # every group at the top width: phase 1's reference
    candidates = [((act_bits, QuantizationDataType.int), (b, QuantizationDataType.int)) for b in sorted(widths, reverse=True)]
    with _mock_v1_quantizers(sim):
        sim.connected_graph.assert_safe()
        algo = GreedyMixedPrecisionAlgo(sim, dummy, candidates, CallbackFunc(accuracy, None), CallbackFunc(accuracy, None),
                                        str(results_dir), True, CallbackFunc(calibrate, None), True, False, False)
        algo._get_best_candidate()  # AIMET's uniform evaluation of every candidate (its phase 2 needs the lowest)
        algo.set_baseline(baseline_candidate=candidates[0])
        algo.run(None, AMPSearchAlgo.BruteForce)
    if not algo.pareto_list or len(algo.pareto_list) != len(algo.accuracy_list):
        raise AllocationError("AIMET returned no complete Pareto front (its phase 2 exited early)")
    flips, front = [], []
    for index, ((group, candidate, score, _), (relative_bitops, point_score, _, _)) in enumerate(zip(algo.accuracy_list, algo.pareto_list)):
        flips.append(Flip(tuple(group.parameter_quantizers), int(candidate[1][0]), float(score)))
        front.append(FrontPoint(index + 1, float(relative_bitops), float(point_score)))
    return flips, front, float(baseline)


def aimet(evaluator: SearchEvaluator, target: Target, *, start_bits: int | None = None, min_bits: int = 1,
          spend_slack: bool = True, progress: bool = True, **_) -> AllocationResult:
    """One width per layer from AIMET's Pareto front at the budget, the rest spent by its phase-1
    sensitivity (see the module docstring). Widths ``min_bits..start_bits`` as for ``sensitivity`` and
    ``hawq``: with 2 as the lowest, AIMET's front at W2 never reaches the budget (every layer at 2 bits
    is its last point, and the slack above 2.00 is small)."""
    if not aimet_available():
        raise AllocationError(f"the aimet allocator needs AIMET: {INSTALL_HINT}")
    space = evaluator.space
    widths = candidate_widths("aimet", target, min_bits, start_bits)
    start = widths[-1]
    log = SearchLog(evaluator, "aimet", progress, total=1)  # started before AIMET runs: its seconds include AIMET's
    with tempfile.TemporaryDirectory(prefix="cpq-aimet-") as folder:
        aimet_act_bits = max(target.act_bits, AIMET_MIN_ACT_BITS)
        flips, front, top_accuracy = run_aimet(evaluator, aimet_act_bits, widths, Path(folder))
    extra = extra_budgets(evaluator, target)
    plans = prefix_plans(space, flips, start)
    index = choose_front_point(space, plans, target.max_bits, extra)
    if index is None:
        raise AllocationError(f"no point of AIMET's front keeps the budget {target.max_bits:.3f} bits "
                              f"(its lowest reaches {min(space.average(p) for p in plans):.3f}); lower min_bits")
    bits = plans[index]
    layer_bits = [int(bits[space.offsets[i]]) for i in range(len(space.names))]
    if spend_slack:
        rise = loss_rise_table(space, flips, top_accuracy, widths)
        bits = spend_by_sensitivity(space, bits, layer_bits, rise, target.max_bits, start, extra)
    accuracy, _, _ = log.try_bits(bits, "final", "chosen plan")
    details = {"front": [{"flips": p.flips, "relative_bitops": round(p.relative_bitops, 6), "accuracy": round(p.accuracy, 6),
                          "average_bits": round(space.average(plans[p.flips - 1]), 6)} for p in front],
               "phase1": [{"layers": list(f.layers), "bits": f.bits, "accuracy": round(f.accuracy, 6)} for f in flips],
               "front_point": index + 1, "layer_bits": dict(zip(space.names, layer_bits)),
               "aimet_top_accuracy": round(top_accuracy, 6), "aimet_act_bits": aimet_act_bits}
    return log.result("aimet", bits, target, accuracy,
                      {"start_bits": start, "min_bits": min_bits, "spend_slack": spend_slack}, details)
