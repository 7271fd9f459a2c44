"""fedmoe: personalised federated fine-tuning of Mixture-of-Experts language models.

Implements FedMoE (Mei et al. 2024), HFedMoE, FLEx and the baselines FedAvg, FedProx,
SCAFFOLD and randomMoE on native Hugging Face MoE classes.
"""

__version__ = "0.1.0"

from fedmoe.quiet import filter_upstream_warnings as _filter_upstream_warnings  # noqa: E402

_filter_upstream_warnings()
