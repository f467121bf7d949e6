"""Errors keep the Rust variants' field names (safe_fedllm.errors)."""

from __future__ import annotations

import numpy as np
import pytest

import safe_fedllm as sf
from conftest import KEY, client_update

QB0 = KEY.format(layer=0, module="q", factor="B")


def test_errors_keep_the_core_field_names(tmp_path, global_arrays, rng):
    """Each exception carries the Rust variant's own field names, never a
    generic `what`/`index` standing in for them."""
    qa0 = QB0.replace("lora_B", "lora_A")
    odd = sf.Adapter.from_arrays({qa0: global_arrays[qa0], QB0: np.zeros((16, 3), np.float32)})
    with pytest.raises(sf.ShapeMismatchError) as info:  # lora_A is 4 x 16, lora_B 16 x 3
        odd.rank
    e = info.value
    assert e.kind == "rank_mismatch" and (e.a_rank, e.b_rank) == (4, 3)
    assert e.a_shape == [4, 16] and e.b_shape == [16, 3] and e.module in QB0
    with pytest.raises(sf.ShapeMismatchError) as info:
        sf.Adapter.from_arrays({QB0: np.zeros((2, 2, 2), np.float32)})
    assert info.value.kind == "not_a_matrix" and info.value.tensor == QB0 and info.value.shape == [2, 2, 2]
    few = [(str(i), client_update(global_arrays, rng, False), 10) for i in range(3)]
    with pytest.raises(sf.TooFewClientsError) as info:
        sf.Aggregator("krum", f=1).aggregate(global_arrays, few)
    e = info.value
    assert (e.rule, e.required, e.found) == ("krum", 5, 3) and "2f + 3" in e.constraint
    deltas = [sf.delta(client_update(global_arrays, rng, False), global_arrays) for _ in range(4)]
    with pytest.raises(sf.TrainingError) as info:
        sf.Probe.train(deltas, [False] * 4)
    assert info.value.kind == "missing_class" and info.value.missing == "malicious" and info.value.samples == 4
    with pytest.raises(sf.InvalidParameterError) as info:
        sf.Aggregator("trimmed_mean", beta=0.7)
    assert (info.value.component, info.value.name, info.value.value) == ("trimmed_mean", "beta", "0.7")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x01\x02")
    with pytest.raises(sf.FormatError) as info:
        sf.Adapter.load(garbage)
    assert info.value.kind == "malformed" and info.value.malformed == "header_too_small"
    assert info.value.path == str(garbage)
    with pytest.raises(sf.SafeFedLLMIOError) as info:
        sf.Adapter.load(tmp_path / "missing.safetensors")
    assert info.value.kind == "io" and "No such file" in info.value.source
    for e in (info.value,):
        assert "what" not in e.fields() and "param" not in e.fields()
