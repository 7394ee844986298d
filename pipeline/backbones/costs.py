"""What reaching a tap costs: multiply-adds (as GFLOPs, two per multiply-add) and parameters.

Counted from each layer's shapes, for every layer type that multiplies by weights: convolutions of any
rank (grouped ones too, as ConvNeXt's depthwise blocks are written), depthwise and separable
convolutions, transposed convolutions, Dense over any leading axes (ConvNeXt's pointwise layers run on
maps), and multi-head attention (its projections and the two products of scores). Layers
inside nested models (ConvNeXt's stem and downsampling are Sequential) are counted too. Elementwise
layers (activations, normalisation, additions, pooling) are left out, as the usual GFLOPs figures do.
"""

from __future__ import annotations

from math import prod

from pipeline.backbones.build import cut_trunk
from pipeline.core.runtime import import_keras


def tap_costs(model, taps) -> dict[str, dict[str, float]]:
    """Forward-pass cost of reaching each tap: GFLOPs (multiply-adds x 2) and parameters used."""
    costs = {}
    for tap in taps:
        trunk = cut_trunk(model, tap)
        costs[tap] = {"gflops": 2 * sum(map(multiply_adds, trunk.layers)) / 1e9, "params": int(trunk.count_params())}
    return costs


def multiply_adds(layer) -> int:
    """Multiply-adds of one call of ``layer`` at its built input size (a nested model: of its layers)."""
    keras = import_keras()
    layers = keras.layers
    if hasattr(layer, "layers"):  # a nested Model or Sequential
        return sum(map(multiply_adds, layer.layers))
    if isinstance(layer, layers.MultiHeadAttention):
        return _attention(layer)
    if not getattr(layer, "built", False) or not hasattr(layer, "output"):
        return 0
    out = tuple(layer.output.shape[1:])
    if isinstance(layer, layers.SeparableConv2D | layers.SeparableConv1D):
        *window, in_channels, multiplier = layer.depthwise_kernel.shape
        return prod(out[:-1]) * (prod(window) * in_channels * multiplier + in_channels * multiplier * out[-1])
    if isinstance(layer, layers.DepthwiseConv2D | layers.DepthwiseConv1D):
        *window, in_channels, multiplier = layer.kernel.shape
        return prod(out[:-1]) * prod(window) * in_channels * multiplier
    if isinstance(layer, layers.Conv2DTranspose | layers.Conv1DTranspose | layers.Conv3DTranspose):
        *window, out_channels, in_channels = layer.kernel.shape  # each input position spreads over a window
        return prod(tuple(layer.input.shape[1:-1])) * prod(window) * in_channels * out_channels
    if isinstance(layer, layers.Conv2D | layers.Conv1D | layers.Conv3D):
        *window, in_per_group, out_channels = layer.kernel.shape  # grouped: each output sees its group
        return prod(out[:-1]) * prod(window) * in_per_group * out_channels
    if isinstance(layer, layers.Dense):
        return prod(out[:-1]) * layer.kernel.shape[0] * layer.kernel.shape[1]
    return 0


def _attention(layer) -> int:
    """Query, key, value and output projections, plus scores (q k) and their weighting of the values."""
    inputs = layer.input if isinstance(layer.input, list | tuple) else [layer.input]
    n_query = prod(tuple(inputs[0].shape[1:-1]))
    n_key = prod(tuple(inputs[-1].shape[1:-1]))  # key and value: the value input, unless a key is given
    q, k, v, o = (prod(d.kernel.shape) for d in (layer._query_dense, layer._key_dense, layer._value_dense,
                                                  layer._output_dense))
    heads, key_dim = layer._query_dense.kernel.shape[-2:]
    value_dim = layer._value_dense.kernel.shape[-1]
    return n_query * (q + o) + n_key * (k + v) + n_query * n_key * heads * (key_dim + value_dim)
