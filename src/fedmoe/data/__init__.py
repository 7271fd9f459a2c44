"""Data, tasks, metrics, partitions and the paper's four FL settings (docs/algorithms.md §5, §6).

* :mod:`.loaders` / :mod:`.hub` / :mod:`.source`: AG News, SQuAD v1.1, XSum as frozen examples;
* :mod:`.tasks` / :mod:`.metrics`: how a model sees each task and how it is scored;
* :mod:`.partition` / :mod:`.samplers` / :mod:`.settings`: clients, splits, budgets, rounds;
* :mod:`.describe`: ``fedmoe data describe CONFIG``.
"""
