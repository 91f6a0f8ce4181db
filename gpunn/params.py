"""The parameter store: every weight and bias of a network in one flat buffer, every gradient in another.

Each layer's W and b (and ∂E/∂W, ∂E/∂b) are views into the store's buffers, laid out W₁, b₁, W₂, b₂, ...
so an optimiser step is a few whole-buffer operations (eq 15 over all weights at once) and data-parallel
training sums all gradients in one call. The store knows its device and dtype and can move to another.
"""
from __future__ import annotations

import numpy

from .backend import Device, to_host
from .errors import ShapeError
from .layers import Dense
from .types import Array, DTypeLike

__all__ = ["ParameterStore", "layout"]


def layout(layers: list[Dense]) -> list[tuple[slice, slice]]:
    """Where each layer's W and b live in the flat buffers: W₁, b₁, W₂, b₂, ..."""
    out, off = [], 0
    for layer in layers:
        nw = layer.n_in * layer.n_out
        out.append((slice(off, off + nw), slice(off + nw, off + nw + layer.n_out)))
        off += nw + layer.n_out
    return out


class ParameterStore:
    """The flat parameter and gradient buffers of ``layers`` on ``device``, bound into the layers as views.

    Parameters
    ----------
    layers : list of Dense
    device : Device
    dtype : numpy dtype of both buffers
    host_params : array of shape (n_parameters,), the starting values (on the host)
    """

    def __init__(self, layers: list[Dense], device: Device, dtype: DTypeLike, host_params: numpy.ndarray):
        self.layers, self.device, self.dtype = layers, device, numpy.dtype(dtype)
        self.layout = layout(layers)
        with device.activate():
            self.params: Array = device.asarray(numpy.array(host_params, dtype=self.dtype))   # never a view
            self.grads: Array = device.xp.zeros_like(self.params)
        self._decay_mask: Array = None
        for layer, (w, b) in zip(layers, self.layout):
            shape = (layer.n_in, layer.n_out)
            layer.bind(self.params[w].reshape(shape), self.params[b], self.grads[w].reshape(shape), self.grads[b])

    @classmethod
    def initial(cls, layers: list[Dense], device: Device, dtype: DTypeLike,
                rng: numpy.random.Generator) -> ParameterStore:
        """A store of freshly drawn weights (each layer's initialiser, from ``rng``) and zero biases."""
        host = numpy.zeros(sum(layer.n_in * layer.n_out + layer.n_out for layer in layers))
        for layer, (w, _) in zip(layers, layout(layers)):
            host[w] = layer.initial_weights(rng).ravel()     # biases start at zero
        return cls(layers, device, dtype, host)

    @property
    def size(self) -> int:
        return int(self.params.size)

    def host(self) -> numpy.ndarray:
        """A host copy of the parameters (never a view of the live buffer)."""
        return numpy.array(to_host(self.params), copy=True)

    def assign(self, host_params: numpy.ndarray) -> None:
        """Set every parameter from an array of exactly the store's shape (never broadcast)."""
        shape = getattr(host_params, "shape", None)
        if shape != self.params.shape:
            raise ShapeError(f"parameters of shape {shape} given for a store of {self.size} parameters")
        self.params[...] = self.device.asarray(host_params, dtype=self.dtype)

    def moved(self, device: Device) -> ParameterStore:
        """The same parameters in a new store on ``device`` (the layers are bound to the new one)."""
        return ParameterStore(self.layers, device, self.dtype, to_host(self.params))

    def decay_mask(self) -> Array:
        """1 for weights, 0 for biases, as a flat array (made once; used by weight decay)."""
        if self._decay_mask is None:
            host = numpy.zeros(self.size)
            for w, _ in self.layout:
                host[w] = 1.0
            self._decay_mask = self.device.asarray(host, dtype=self.dtype)
        return self._decay_mask
