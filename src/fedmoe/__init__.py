"""fedmoe: personalised federated fine-tuning of Mixture-of-Experts language models.

Implements FedMoE (Mei et al. 2024), HFedMoE, FLEx and the baselines FedAvg, FedProx,
SCAFFOLD and randomMoE on native Hugging Face MoE classes.

Process policy (:func:`apply_process_policy`): fedmoe's own processes — the ``fedmoe`` command
and the Flower apps — set, before ``torch`` is imported and only where the environment does not
already set them (see docs/results.md, "Thread and allocator policy"):

* ``THP_MEM_ALLOC_ENABLE=1``: torch's CPU allocator backs tensors ≥ 2 MB with transparent huge
  pages, so fresh tensors (sub-MoE extraction, aggregation results, clones) are not paid for
  one 4 kB page fault at a time;
* ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning, so processes that
  share cores (simulated clients, Flower processes, other jobs) do not steal each other's time.
  Choose the intra-op thread count with ``OMP_NUM_THREADS`` (cores ÷ processes on one machine).

``import fedmoe`` itself leaves the environment alone: a program using fedmoe as a library
calls :func:`apply_process_policy` first if it wants the same policy.
"""

import os as _os

__version__ = "0.1.0"

#: environment variables of the process policy and their values
PROCESS_POLICY = (("THP_MEM_ALLOC_ENABLE", "1"), ("OMP_WAIT_POLICY", "PASSIVE"))


def apply_process_policy() -> None:
    """Set :data:`PROCESS_POLICY` in ``os.environ`` where unset (call before ``import torch``)."""
    for key, value in PROCESS_POLICY:
        _os.environ.setdefault(key, value)


from fedmoe.quiet import filter_upstream_warnings as _filter_upstream_warnings  # noqa: E402

_filter_upstream_warnings()
