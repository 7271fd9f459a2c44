"""data.exclude_ids: listed example ids never reach a client; a bad file is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmoe.data.loaders import load_local
from fedmoe.data.settings import build_federation
from fedmoe.errors import DataError

from .conftest import real_config


def _all_ids(fed) -> list[str]:
    return [e.id for c in fed.clients for s in (c.train, c.val, c.test) for e in s]


@pytest.mark.parametrize("preset", ["enforced-hetero-t", "standard-hetero-td"])
def test_excluded_ids_reach_no_client_split(real_data: Path, tmp_path: Path, preset: str) -> None:
    # oracle: the file's own rows, read independently of fedmoe's data code path under test
    tc = [e.id for e in load_local(str(real_data), "tc")]
    rc = [e.id for e in load_local(str(real_data), "rc")]
    excluded = set(tc[::3]) | set(rc[1::2])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# a comment\n\n" + "\n".join(sorted(excluded)) + "\n  \n", encoding="utf-8")
    base = [f"setting.preset={preset!r}", "setting.num_clients=6", "data.max_examples_per_task=0"]
    fed = build_federation(real_config(real_data, *base, f"data.exclude_ids={str(ids_file)!r}"))
    got = _all_ids(fed)
    assert len(got) == len(set(got))
    assert not set(got) & excluded
    full = build_federation(real_config(real_data, *base))
    assert set(got) == set(_all_ids(full)) - excluded  # nothing else is lost
    assert sum(c.num_examples for c in fed.clients_of("tc")) == len(tc) - len(tc[::3])
    assert sum(c.num_examples for c in fed.clients_of("rc")) == len(rc) - len(rc[1::2])


def test_cap_applies_after_exclusion(real_data: Path, tmp_path: Path) -> None:
    tc = [e.id for e in load_local(str(real_data), "tc")]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(tc[: len(tc) - 500]), encoding="utf-8")  # leaves exactly 500 TC rows
    fed = build_federation(real_config(real_data, "setting.num_clients=6", "data.max_examples_per_task=600",
                                       f"data.exclude_ids={str(ids_file)!r}"))
    assert sorted(e.id for c in fed.clients_of("tc") for s in (c.train, c.val, c.test) for e in s) == sorted(tc[-500:])
    assert sum(c.num_examples for c in fed.clients_of("rc")) == 600


def test_missing_ids_file_is_a_data_error(real_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.exclude_ids file .* does not exist"):
        build_federation(real_config(real_data, f"data.exclude_ids={str(tmp_path / 'nope.txt')!r}"))


def test_missing_ids_file_through_the_cli_is_one_line_exit_2(real_data: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from fedmoe.cli import app

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    args = ["run", str(repo / "configs" / "tiny.toml"), "--set", f"data.data_dir={str(real_data)!r}",
            "--set", f"data.exclude_ids={str(tmp_path / 'nope.txt')!r}", "--out", str(out)]
    with pytest.raises(SystemExit) as info:
        app(args, prog_name="fedmoe")
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and "data.exclude_ids" in err and "nope.txt" in err and "Fix:" in err
    assert not out.exists()  # a failed fresh run leaves no output folder
