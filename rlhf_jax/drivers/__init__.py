"""The stage drivers: data, models, mesh and checkpoints around the pure steps, one shape each.

Each ``run_<stage>(config) -> run directory`` loads its models (``checkpoint.load_model``)
and data (``data.load_split_tokenize``), builds the pure step of its stage module
(``sft``, ``reward``, ``ppo``), places the state on the mesh, and hands a
``train_loop.Stage`` to ``train_loop.run``. Running the same config again resumes.
"""

from rlhf_jax.drivers.dpo import run_dpo
from rlhf_jax.drivers.ppo import run_ppo
from rlhf_jax.drivers.rm import run_rm
from rlhf_jax.drivers.sample import run_sample
from rlhf_jax.drivers.sft import run_sft

__all__ = ["run_dpo", "run_ppo", "run_rm", "run_sample", "run_sft"]
