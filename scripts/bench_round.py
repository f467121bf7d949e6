"""The aggregator benches' round, shared by the Flower and torch side-by-side scripts.

Same values as `benches/aggregate.rs`: a Llama-3.1-8B LoRA r=8 q_proj/v_proj adapter
(d = 3,407,872 at 32 layers), tensors in sorted key order, values from
`safe_fedllm::rng` (SplitMix64 output for a per-stream counter).
"""
import numpy as np

HIDDEN, KV, RANK = 4096, 1024, 8
GAMMA = np.uint64(0x9E3779B97F4A7C15)
C1, C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix(z):
    """safe_fedllm::rng::mix64 (SplitMix64's output for counter z)."""
    z = z + GAMMA
    z = (z ^ (z >> np.uint64(30))) * C1
    z = (z ^ (z >> np.uint64(27))) * C2
    return z ^ (z >> np.uint64(31))


def values(stream, start, length):
    z = (np.uint64(stream) << np.uint64(32)) + np.arange(start, start + length, dtype=np.uint64)
    u = (mix(z) >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    return (u - np.float32(0.5)) * np.float32(0.02)


def shapes(layers):
    out = []
    for layer in range(layers):
        for module, o in (("q_proj", HIDDEN), ("v_proj", KV)):
            path = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out.append((f"{path}.lora_A.weight", (RANK, HIDDEN)))
            out.append((f"{path}.lora_B.weight", (o, RANK)))
    return sorted(out)



def adapter(layers, stream, global_layers=None):
    """One client's tensors (a list in sorted key order), optionally offset by a global."""
    result, offset = [], 0
    for k, (_, shape) in enumerate(shapes(layers)):
        length = shape[0] * shape[1]
        v = values(stream, offset, length).reshape(shape)
        if global_layers is not None:
            v = v + global_layers[k]
        result.append(v)
        offset += length
    return result
