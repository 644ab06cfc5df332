"""The adaptive hyper-recurrent unit: ONE cell scanned over the target's parameter tensors.

PudNet's recurrent unit carries information from layer to layer so that each layer's weights are
generated knowing what came before (the inputs a layer sees depend on the layers below). We scan a
GRU cell with ``nn.scan`` and broadcast its parameters: the same weights serve every layer, so the
hypernetwork's size does not depend on the target's depth. The cell is conditioned on the dataset
sketch at every step (it enters the input, and FiLM-modulates the output).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class AdaptiveRecurrentCell(nn.Module):
    """One step: (state, layer descriptor, sketch) -> (new state, layer embedding)."""

    hidden_dim: int = 256
    use_sketch: bool = True

    @nn.compact
    def __call__(self, state, descriptor, sketch):
        x = nn.gelu(nn.Dense(self.hidden_dim, name="descriptor_embed")(descriptor))
        if self.use_sketch:
            x = jnp.concatenate([x, sketch], axis=-1)
        state, out = nn.GRUCell(self.hidden_dim, name="gru")(state, x)
        if self.use_sketch:
            film = nn.Dense(2 * self.hidden_dim, name="sketch_film",
                            kernel_init=nn.initializers.zeros)(sketch)
            scale, shift = jnp.split(film, 2, axis=-1)
            out = out * (1.0 + scale) + shift
        return state, nn.LayerNorm(name="out_norm")(out)


class LayerRecurrence(nn.Module):
    """Runs the shared cell over all layer descriptors ``[L, F]`` -> layer embeddings ``[L, H]``."""

    hidden_dim: int = 256
    use_sketch: bool = True

    @nn.compact
    def __call__(self, descriptors, sketch):
        if self.use_sketch:
            state = jnp.tanh(nn.Dense(self.hidden_dim, name="initial_state")(sketch))
        else:
            state = jnp.zeros((self.hidden_dim,), descriptors.dtype)
        scan = nn.scan(
            AdaptiveRecurrentCell,
            variable_broadcast="params",  # one parameter set shared by every layer
            split_rngs={"params": False},
            in_axes=(0, nn.broadcast),
            out_axes=0,
        )
        _, embeddings = scan(self.hidden_dim, self.use_sketch, name="cell")(state, descriptors, sketch)
        return embeddings


class IndependentLayers(nn.Module):
    """Ablation: no recurrence; each layer's embedding depends only on its own descriptor."""

    hidden_dim: int = 256
    use_sketch: bool = True

    @nn.compact
    def __call__(self, descriptors, sketch):
        x = descriptors
        if self.use_sketch:
            x = jnp.concatenate([x, jnp.broadcast_to(sketch, (x.shape[0], sketch.shape[-1]))], axis=-1)
        x = nn.gelu(nn.Dense(self.hidden_dim)(x))
        x = nn.gelu(nn.Dense(self.hidden_dim)(x))
        return nn.LayerNorm()(x)
