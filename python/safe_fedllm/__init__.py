"""safe_fedllm: LoRA-weight probe defenses for federated LLM fine-tuning.

Python bindings of the Rust crate ``safe-fedllm``. numpy float32 arrays in
PEFT key names (``get_peft_model_state_dict(model)`` converted to numpy) reach
the Rust code without copying, heavy work releases the GIL, and errors are
typed (:mod:`safe_fedllm.errors`).

>>> import numpy as np, safe_fedllm as sf
>>> key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
>>> d = sf.delta({key: np.ones((4, 2), np.float32)}, {key: np.zeros((4, 2), np.float32)})
>>> d.num_params
8

Arrays are read in place while the GIL is released: do not write to them
from another thread while a call that reads them is running.

Threads: parallel work (aggregation, admission, features, probe training)
runs on one shared pool with one thread per core. Cap it with the
``RAYON_NUM_THREADS`` environment variable or, once at start-up before any
other call, :func:`set_num_threads`.

Modules: :mod:`safe_fedllm.flower` (a Flower Message-API strategy),
:mod:`safe_fedllm.client` (step trail and shadow branch for a ClientApp),
:mod:`safe_fedllm.probe_runs` (collect labelled LoRA runs of your own base
model and build a probe from them), :mod:`safe_fedllm.torch` (PEFT helpers).
"""

from ._native import (
    Adapter,
    Aggregator,
    DefendedRound,
    Detector,
    FeatureSpec,
    Probe,
    __version__,
    canonical_key,
    check_spec,
    delta,
    set_num_threads,
)
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__all__ = [
    "Adapter",
    "Aggregator",
    "DefendedRound",
    "Detector",
    "FeatureSpec",
    "Probe",
    "__version__",
    "canonical_key",
    "check_spec",
    "delta",
    "set_num_threads",
    *_errors_all,
]
