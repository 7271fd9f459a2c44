"""Keys that moved to ``[federation]``: refused in configs and overrides with one line naming
the new key; translated silently where a run's own stored config is read."""

from __future__ import annotations

import json

import pytest

from fedmoe.config import ExperimentConfig, dump_toml, load_config
from fedmoe.config_keys import MOVED, migrate, migrate_flat
from fedmoe.errors import ConfigError

#: written out here, independently of the table under test
OLD_TO_NEW = {"fedmoe.rounds": "federation.rounds", "setting.clients_per_round": "federation.clients_per_round",
              "fedmoe.exclude_unfit": "federation.exclude_unfit"}
VALUES = {"fedmoe.rounds": 7, "setting.clients_per_round": 4, "fedmoe.exclude_unfit": True}


def _toml(entries: dict[str, object]) -> str:
    sections: dict[str, list[str]] = {}
    for key, v in entries.items():
        sec, _, name = key.partition(".")
        sections.setdefault(sec, []).append(f"{name} = {json.dumps(v)}")
    return "seed = 3\n" + "".join(f"\n[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())


def test_the_table_is_the_three_moved_keys_and_names_real_keys():
    assert MOVED == OLD_TO_NEW
    cfg = ExperimentConfig()
    for new in MOVED.values():
        sec, name = new.split(".")
        assert hasattr(getattr(cfg, sec), name)
    for old in MOVED:
        sec, name = old.split(".")
        assert not hasattr(getattr(cfg, sec), name)


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_old_key_in_a_file_or_override_is_one_line_naming_the_new_key(tmp_path, old):
    f = tmp_path / "old.toml"
    f.write_text(_toml({old: VALUES[old]}))
    for args in ((f, None), (None, [f"{old}={json.dumps(VALUES[old])}"])):
        with pytest.raises(ConfigError) as err:
            load_config(*args)
        assert str(err.value).startswith(f"{old} moved to {OLD_TO_NEW[old]}.")
        assert "\n" not in str(err.value)


def test_stored_config_with_old_keys_is_translated(tmp_path):
    f = tmp_path / "config.toml"
    f.write_text(_toml({**VALUES, "fedmoe.alpha": 0.5}))
    cfg = load_config(f, stored=True)
    assert (cfg.federation.rounds, cfg.federation.clients_per_round, cfg.federation.exclude_unfit) == (7, 4, True)
    assert cfg.fedmoe.alpha == 0.5 and cfg.seed == 3
    # overrides on a stored config must use the new names
    assert load_config(f, ["federation.rounds=9"], stored=True).federation.rounds == 9
    with pytest.raises(ConfigError, match="fedmoe.rounds moved to federation.rounds"):
        load_config(f, ["fedmoe.rounds=9"], stored=True)


def test_a_new_config_round_trips_and_migrate_leaves_it_alone(tmp_path):
    cfg = load_config(None, ["federation.rounds=3", "federation.clients_per_round=2"])
    f = tmp_path / "config.toml"
    f.write_text(dump_toml(cfg))
    assert load_config(f) == cfg == load_config(f, stored=True)
    assert "[federation]\nrounds = 3\nclients_per_round = 2\nexclude_unfit = false" in f.read_text()


def test_migrate_nested_and_flat():
    old = {"setting": {"clients_per_round": 4, "num_clients": 6}, "fedmoe": {"rounds": 7}}
    assert migrate(old) == {"setting": {"num_clients": 6}, "federation": {"clients_per_round": 4, "rounds": 7}}
    assert old == {"setting": {"clients_per_round": 4, "num_clients": 6}, "fedmoe": {"rounds": 7}}  # not mutated
    assert migrate_flat({"fedmoe.rounds": 7, "seed": 1}) == {"federation.rounds": 7, "seed": 1}
