"""Which tensors of a network must share one channel permutation, found from its ``torch.fx`` graph.

Permuting the output channels of a convolution changes the function unless every reader of that
tensor takes its inputs in the new order, and every tensor added to it (a residual stream), every
BatchNorm and depthwise convolution on the way, is permuted alike. A *channel space* is such a set:
the tensors (and the module sides that index them) that one permutation must move together. We
trace the model (``torch.fx``, quantized layers and activation quantizers as leaves), propagate
shapes on an example input, and join tokens with a union-find:

* Conv2d (``groups=1``) / Linear: the input space is the layer's *columns*, the output a new space,
  the layer's *rows*. A depthwise convolution (``groups == in == out``) and BatchNorm pass the space
  through and index it on their own parameters.
* Element-wise operations (activations, pooling, dropout, additions and products of tensors of the
  same channel count) pass it through or join spaces: that is how residual additions share one
  permutation. A flatten or view that keeps the channel count (spatial size 1) passes it through.
* ``flatten(x, 1)`` of an (N, C, H, W) tensor read only by Linear layers: the Linear's columns
  ``c * H * W .. (c + 1) * H * W - 1`` belong to channel c (VGG's classifier).
* Everything else fixes the spaces it touches (they keep their order): the model input and output
  (class order), grouped convolutions other than depthwise (a permutation would have to respect the
  groups), concatenations, parameters read directly, reshapes that mix channels with positions,
  modules we do not know. A fixed space is reported with its reason, never silently permuted.

No library offers this: torch.fx gives the graph, but channel-permutation analyses live inside
pruning tools (torch-pruning's dependency graph) whose rules and dependencies are heavier than the
few cases here, hence our own.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..quant.modules import QuantizedLayer
from ..quant.quantizers import ActivationQuantizer, WeightQuantizer

# modules and functions that keep dim 1 (channels) as it is, element by element or per channel
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                 nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, ActivationQuantizer)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                   torch.sigmoid, torch.tanh, F.sigmoid, F.dropout, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                   F.avg_pool2d, F.max_pool2d, torch.clamp}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "contiguous", "clone", "detach"}
_JOIN_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                   operator.truediv, torch.add, torch.sub, torch.mul}
_JOIN_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}
_REDUCE_METHODS = {"mean", "sum", "amax"}


class _Tracer(fx.Tracer):
    """Quantized layers, quantizers and anything ``torch.nn`` itself defines stay leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantizedLayer, ActivationQuantizer, WeightQuantizer, nn.Conv2d, nn.Linear)):
            return True
        if not any(True for _ in m.children()) and not isinstance(m, nn.Sequential):
            return True  # a module without children (e.g. an input normalisation) is opaque: its rule decides
        return super().is_leaf_module(m, qualname)


@dataclass
class ChannelSpace:
    """Channels that one permutation moves together: who indexes them on the output side, who reads them."""

    channels: int
    rows: list[str] = field(default_factory=list)        # Conv2d / Linear whose output channels these are
    depthwise: list[str] = field(default_factory=list)   # depthwise convolutions on the way (rows and bias)
    norms: list[str] = field(default_factory=list)       # BatchNorms on the way
    columns: list[str] = field(default_factory=list)     # Conv2d / Linear reading them as input channels
    column_repeat: dict[str, int] = field(default_factory=dict)  # Linear after a flatten: columns per channel (c * k + j)
    fixed: list[str] = field(default_factory=list)       # why it may not be permuted (empty: it may)

    @property
    def permutable(self) -> bool:
        return not self.fixed


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}
        self.size: dict = {}
        self.reasons: dict = {}

    def add(self, token, channels: int) -> None:
        if token not in self.parent:
            self.parent[token], self.size[token], self.reasons[token] = token, channels, []

    def find(self, token):
        while self.parent[token] != token:
            self.parent[token] = self.parent[self.parent[token]]
            token = self.parent[token]
        return token

    def union(self, a, b, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise ValueError(f"channel graph: {where} joins tensors of {self.size[ra]} and {self.size[rb]} channels")
        self.parent[rb] = ra
        self.reasons[ra] += self.reasons.pop(rb)

    def fix(self, token, reason: str) -> None:
        self.reasons[self.find(token)].append(reason)


def _meta(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return meta if meta is not None and hasattr(meta, "shape") else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _meta(n) is not None else None)
    return found


def _same_channels(node: fx.Node, source: fx.Node) -> bool:
    """Output and input agree in batch and channel dims (an element-wise or per-channel operation)."""
    out, src = _meta(node), _meta(source)
    return (out is not None and src is not None and len(out.shape) >= 2 and len(src.shape) >= 2
            and tuple(out.shape[:2]) == tuple(src.shape[:2]))


def _flatten_keeps(node: fx.Node, source: fx.Node) -> bool:
    """A flatten / view / squeeze that keeps batch and channel dims: what follows dim 1 is all size 1, before and after."""
    if not _same_channels(node, source):
        return False
    return math.prod(_meta(node).shape[2:]) == 1 and math.prod(_meta(source).shape[2:]) == 1


def _flattens_into_linear(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``flatten(x, 1)`` of an (N, C, ...) tensor, read by Linear layers only (VGG's classifier)."""
    out, src = _meta(node), _meta(source)
    if out is None or src is None or len(src.shape) < 3 or len(out.shape) != 2:
        return False
    if tuple(out.shape) != (src.shape[0], math.prod(src.shape[1:])):
        return False
    return bool(node.users) and all(user.op == "call_module" and isinstance(modules.get(str(user.target)), nn.Linear)
                                    and user.args and user.args[0] is node for user in node.users)


def channel_spaces(model: nn.Module, example_input: torch.Tensor) -> list[ChannelSpace]:
    """The channel spaces of ``model`` (see the module docstring), from a trace on ``example_input``.

    ``model`` itself is not run (a copy propagates the shapes), so quantizers are not initialised by it.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds for untraceable Python control flow
        raise ValueError(f"channel graph: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                         "permutation-consistent reordering needs a traceable model") from exc
    shadow = copy.deepcopy(model).eval()
    module = fx.GraphModule(shadow, graph)
    with torch.no_grad():
        ShapeProp(module).propagate(example_input.to(next(shadow.parameters()).device))
    modules = dict(model.named_modules())
    uf = _UnionFind()
    flattened: dict[str, tuple[fx.Node, int]] = {}  # flatten output read only by Linear -> (its input, positions per channel)
    repeats: dict[str, int] = {}

    def token_of(node: fx.Node):
        return ("node", node.name)

    def side(kind: str, name: str, channels: int):
        token = (kind, name)
        uf.add(token, channels)
        return token

    def fresh(node: fx.Node, reason: str | None = None):
        meta = _meta(node)
        channels = int(meta.shape[1]) if meta is not None and len(meta.shape) >= 2 else 0
        uf.add(token_of(node), channels)
        if reason:
            uf.fix(token_of(node), reason)
        return token_of(node)

    def fix_inputs(node: fx.Node, reason: str) -> None:
        for arg in _tensor_args(node):
            uf.fix(token_of(arg), reason)

    def passthrough(node: fx.Node, source: fx.Node) -> None:
        fresh(node)
        uf.union(token_of(source), token_of(node), node.name)

    for node in graph.nodes:
        if node.op == "placeholder":
            if _meta(node) is not None:
                fresh(node, "the model input")
            continue
        if node.op == "output":
            fix_inputs(node, "the model output")
            continue
        if _meta(node) is None:  # sizes, shapes, tuples: no channels of their own
            reads_metadata = (node.op == "call_method" and node.target in ("size", "dim")
                              or node.op == "call_function" and node.target in (getattr, operator.getitem)
                              and not (node.target is operator.getitem and _meta(node.args[0]) is not None))
            if node.op != "get_attr" and not reads_metadata:
                fix_inputs(node, f"read by {node.op} {node.target} (not a tensor operation we know)")
            continue
        if node.op == "get_attr":
            fresh(node, f"parameter or buffer {node.target} read directly")
            continue
        inputs = _tensor_args(node)
        first = inputs[0] if inputs else None
        if node.op == "call_module":
            name, layer = str(node.target), modules[str(node.target)]
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and first is not None:
                if isinstance(layer, nn.Linear) and len(_meta(first).shape) != 2:
                    fix_inputs(node, f"read by Linear {name} on a {len(_meta(first).shape)}-d input (channels not in dim 1)")
                    fresh(node, f"output of Linear {name} on a {len(_meta(first).shape)}-d input")
                    continue
                groups = getattr(layer, "groups", 1)
                out_channels, in_channels = layer.weight.shape[0], layer.weight.shape[1] * groups
                if isinstance(layer, nn.Linear) and first.name in flattened:
                    source, repeat = flattened[first.name]
                    uf.union(token_of(source), side("columns", name, in_channels // repeat), name)
                    repeats[name] = repeat
                    fresh(node)
                    uf.union(side("rows", name, out_channels), token_of(node), name)
                elif groups == 1:
                    uf.union(token_of(first), side("columns", name, in_channels), name)
                    fresh(node)
                    uf.union(side("rows", name, out_channels), token_of(node), name)
                elif groups == in_channels == out_channels:
                    passthrough(node, first)
                    uf.union(token_of(node), side("depthwise", name, out_channels), name)
                else:
                    reason = f"read or written by grouped convolution {name} (groups={groups}, not depthwise)"
                    uf.union(token_of(first), side("columns", name, in_channels), name)
                    fresh(node)
                    uf.union(side("rows", name, out_channels), token_of(node), name)
                    fix_inputs(node, reason)
                    uf.fix(token_of(node), reason)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and first is not None:
                passthrough(node, first)
                uf.union(token_of(node), side("norms", name, layer.num_features), name)
            elif first is not None and (isinstance(layer, _PASS_MODULES) and _same_channels(node, first)
                                        or isinstance(layer, nn.Flatten) and _flatten_keeps(node, first)):
                passthrough(node, first)
            else:
                reason = f"read by module {name} ({type(layer).__name__}), whose channel rule is unknown"
                fix_inputs(node, reason)
                fresh(node, reason)
            continue
        target = node.target
        is_method = node.op == "call_method"
        if first is not None and ((not is_method and target in _PASS_FUNCTIONS) or (is_method and target in _PASS_METHODS)) \
                and _same_channels(node, first):
            passthrough(node, first)
        elif (not is_method and target in _JOIN_FUNCTIONS) or (is_method and target in _JOIN_METHODS):
            out = _meta(node)
            fresh(node)
            for arg in inputs:
                shape = _meta(arg).shape
                if len(shape) == len(out.shape) and len(shape) >= 2 and shape[1] == out.shape[1]:
                    uf.union(token_of(node), token_of(arg), node.name)
                elif not (len(shape) == len(out.shape) and shape[1] == 1) and math.prod(shape) != 1:
                    uf.fix(token_of(arg), f"broadcast into {node.name} across channels")
                    uf.fix(token_of(node), f"{node.name} broadcasts a tensor across channels")
        elif first is not None and ((not is_method and target in _RESHAPE_FUNCTIONS) or (is_method and target in _RESHAPE_METHODS)) \
                and _flatten_keeps(node, first):
            passthrough(node, first)
        elif first is not None and ((not is_method and target is torch.flatten) or (is_method and target == "flatten")) \
                and _flattens_into_linear(node, first, modules):
            fresh(node)  # channel c becomes features c * k .. c * k + k - 1 of the Linear that reads it
            flattened[node.name] = (first, math.prod(_meta(first).shape[2:]))
        elif first is not None and (is_method and target in _REDUCE_METHODS or not is_method and target is torch.mean) \
                and _same_channels(node, first):
            passthrough(node, first)
        else:
            what = getattr(target, "__name__", str(target))
            reason = f"read by {what} ({node.name}), which may mix or move channels"
            fix_inputs(node, reason)
            fresh(node, reason)

    spaces: dict = {}
    for token in list(uf.parent):
        root = uf.find(token)
        space = spaces.setdefault(root, ChannelSpace(channels=uf.size[root], fixed=list(dict.fromkeys(uf.reasons[root]))))
        kind = token[0] if token[0] != "node" else None  # ("rows" | "columns" | ..., module name), ("node", fx name)
        if kind is not None:
            getattr(space, kind).append(token[1])
            if kind == "columns" and token[1] in repeats:
                space.column_repeat[token[1]] = repeats[token[1]]
    return [s for s in spaces.values() if s.rows or s.columns or s.depthwise or s.norms]
