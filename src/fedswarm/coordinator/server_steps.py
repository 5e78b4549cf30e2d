"""Server-side steps on a round's mean, computed tensor by tensor in the mean's own buffers.

Flower's FedAvgM builds whole-model lists (a copy of the global model, the pseudo-gradients, the new weights,
each serialized again): three models beside the global one and the mean. Here each tensor of the mean is
turned into the new weights in place, the momentum is updated in place, and the result's arrays are the
mean's buffers (TensorArray), with the same float32 operations in the same order as Flower's (and DiLoCo's)
formulas, so the weights are bit for bit the same.
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.exception import AggregationError

from fedswarm.coordinator.aggregate import TensorArray, read_only_view


def owned(array: Array) -> np.ndarray:
    """A writable ndarray of a mean's array the caller owns: a TensorArray's own buffer, else a copy."""
    if isinstance(array, TensorArray):
        return array.tensor.numpy()
    return np.array(array.numpy())


def _array(values: np.ndarray) -> Array:
    """The result's array: the buffer itself when float32, else Flower's serialized copy."""
    return TensorArray(torch.from_numpy(values)) if values.dtype == np.float32 else Array(values)


def _pairs(current: ArrayRecord, mean: ArrayRecord):
    """(old weights, the mean's writable values) per tensor, in the global model's order."""
    keys = list(current.keys())
    if set(mean.keys()) != set(keys):
        raise AggregationError("the replies' tensors do not match the global model's")
    for key in keys:
        yield key, read_only_view(current[key]).numpy(), owned(mean[key])


def _moment(previous: np.ndarray | None, grad: np.ndarray, mu: float) -> np.ndarray:
    """mu * previous + grad, in previous's buffer (a copy of grad at the first step)."""
    if previous is None:
        return grad.copy()
    m = previous if previous.flags.writeable else previous.copy()
    np.multiply(m, mu, out=m)
    return np.add(m, grad, out=m)


def momentum_sgd(current: ArrayRecord, mean: ArrayRecord, lr: float, mu: float,
                 momentum: list[np.ndarray] | None) -> tuple[ArrayRecord, list[np.ndarray] | None]:
    """FedAvgM's step (Flower's formulas): g = old - mean; with mu > 0, m = mu * m + g (m = g at first) and g = m;
    new = old - lr * g. Returns the new weights and momentum."""
    out, moments = ArrayRecord(), []
    for i, (key, old, values) in enumerate(_pairs(current, mean)):
        np.subtract(old, values, out=values)            # the pseudo-gradient
        step = values
        if mu > 0.0:
            step = _moment(None if momentum is None else momentum[i], values, mu)
            moments.append(step)
        np.multiply(step, lr, out=values)
        np.subtract(old, values, out=values)
        out[key] = _array(values)
    return out, (moments if mu > 0.0 else momentum)


def nesterov(current: ArrayRecord, mean: ArrayRecord, lr: float, mu: float,
             momentum: list[np.ndarray] | None) -> tuple[ArrayRecord, list[np.ndarray]]:
    """DiLoCo's outer step: g = old - mean; m = mu * m + g (m = g at first); new = old - lr * (g + mu * m)."""
    out, moments = ArrayRecord(), []
    for i, (key, old, values) in enumerate(_pairs(current, mean)):
        np.subtract(old, values, out=values)            # the outer gradient g
        m = _moment(None if momentum is None else momentum[i], values, mu)
        moments.append(m)
        np.add(values, np.multiply(m, mu), out=values)  # g + mu * m
        np.multiply(values, lr, out=values)
        np.subtract(old, values, out=values)
        out[key] = _array(values)
    return out, moments
