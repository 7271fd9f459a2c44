"""Loaders: official formats, hub path, and one clear DataError per malformed file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmoe.config import DataConfig
from fedmoe.data.examples import RCExample, TCExample, TSExample
from fedmoe.data.hub import load_hub
from fedmoe.data.loaders import load_ag_news, load_squad, load_xsum, resolve_data_dir
from fedmoe.data.source import cap_examples, load_examples
from fedmoe.errors import DataError

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Paris",
            "paragraphs": [
                {
                    "context": "Paris is the capital of France.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "What is Paris?",
                            "answers": [
                                {"text": "the capital of France", "answer_start": 9},
                                {"text": "capital", "answer_start": 13},
                            ],
                        },
                        {
                            "id": "q2",
                            "question": "Where is Paris?",
                            "answers": [{"text": "France", "answer_start": 24}],
                        },
                    ],
                }
            ],
        }
    ],
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_ag_news_reads_every_csv_with_stable_ids(tmp_path: Path) -> None:
    write(tmp_path / "classes.txt", "World\nSports\nBusiness\nSci/Tech\n")
    write(tmp_path / "test.csv", '"3","Oil, prices","Up ""again"""\n"2","Cup","Final\nwon"\n')
    write(tmp_path / "train_head2.csv", '"4","Chip","Faster"\n')
    got = load_ag_news(tmp_path)
    assert got == [
        TCExample("agnews-test-0", "Oil, prices", 'Up "again"', 2, "Business"),
        TCExample("agnews-test-1", "Cup", "Final\nwon", 1, "Sports"),
        TCExample("agnews-train_head2-0", "Chip", "Faster", 3, "Sci/Tech"),
    ]
    assert got[0].text == 'Oil, prices Up "again"'


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        ('"1","a","b"\n"2","only two"\n', 2, "expected 3 fields"),
        ('"1","a","b"\n"1","multi\nline","ok"\n"9","x","y"\n', 4, "not an integer in 1..4"),
        ('"1","a","b"\n"x","a","b"\n', 2, "label 'x'"),
        ('"1","a","b"\n"1","bad"quote","c"\n', 2, "malformed CSV"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, content: str, line: int, needle: str) -> None:
    path = write(tmp_path / "test.csv", content)
    with pytest.raises(DataError) as err:
        load_ag_news(tmp_path)
    assert f"{path}:{line}:" in err.value.what
    assert needle in err.value.what


def test_squad_reads_all_answers(tmp_path: Path) -> None:
    write(tmp_path / "dev-v1.1.json", json.dumps(SQUAD))
    got = load_squad(tmp_path)
    assert got[0] == RCExample(
        "q1",
        "Paris",
        "Paris is the capital of France.",
        "What is Paris?",
        ("the capital of France", "capital"),
        (9, 13),
    )
    assert [ex.id for ex in got] == ["q1", "q2"]


def test_malformed_squad_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.json", '{"version": "1.1",\n "data": [\n {oops}\n]}\n')
    with pytest.raises(DataError, match=f"{path}:3:3: not valid JSON"):
        load_squad(tmp_path)


def test_malformed_squad_record_names_record(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(SQUAD))
    del bad["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"]
    path = write(tmp_path / "dev.json", json.dumps(bad))
    with pytest.raises(DataError) as err:
        load_squad(tmp_path)
    assert err.value.what.startswith(
        f"{path}: record data[0].paragraphs[0].qas[1].answers[0]: expected key `answer_start`"
    )


def test_xsum_jsonl_and_bad_line(tmp_path: Path) -> None:
    rows = [
        {"id": 7, "document": "Doc one.", "summary": "One."},
        {"id": "b", "document": "Two", "summary": "2"},
    ]
    write(tmp_path / "xsum.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_xsum(tmp_path) == [TSExample("7", "Doc one.", "One."), TSExample("b", "Two", "2")]
    path = write(tmp_path / "xsum.jsonl", json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        load_xsum(tmp_path)
    write(tmp_path / "xsum.jsonl", json.dumps(rows[0]) + '\n{"id": "x", "document": "d"}\n')
    with pytest.raises(
        DataError, match=f'{path}:2: expected an object with string "id", "document" and "summary"'
    ):
        load_xsum(tmp_path)


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    write(tmp_path / "x.jsonl", '{"id": "1", "document": "a", "summary": "b"}\n' * 2)
    with pytest.raises(DataError, match="duplicate example id `1`"):
        load_xsum(tmp_path)


def test_missing_data_dir_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        resolve_data_dir(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in err.value.what
    assert "--set data.data_dir=" in (err.value.fix or "")
    with pytest.raises(DataError, match="Task folder .*squad"):
        load_examples(DataConfig(data_dir=str(tmp_path)), "rc")


def test_hub_path_reads_saved_and_raw_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    feats = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"]),
        }
    )
    ag = datasets.Dataset.from_dict({"text": ["Market up", "Goal!"], "label": [2, 1]}, features=feats)
    datasets.DatasetDict({"test": ag}).save_to_disk(str(tmp_path / "ag"))
    assert load_hub("tc", str(tmp_path / "ag")) == [
        TCExample("agnews-test-0", "", "Market up", 2, "Business"),
        TCExample("agnews-test-1", "", "Goal!", 1, "Sports"),
    ]
    rec = {
        "id": "q1",
        "title": "P",
        "context": "Paris is in France.",
        "question": "Where?",
        "answers": {"text": ["France"], "answer_start": [12]},
    }
    write(tmp_path / "sq" / "validation.jsonl", json.dumps(rec) + "\n")
    write(tmp_path / "xs" / "test.jsonl", json.dumps({"id": "9", "document": "D", "summary": "S"}) + "\n")
    cfg = DataConfig(source="hub", hub_rc=str(tmp_path / "sq"), hub_ts=str(tmp_path / "xs"))
    assert load_examples(cfg, "rc") == [
        RCExample("q1", "P", "Paris is in France.", "Where?", ("France",), (12,))
    ]
    assert load_examples(cfg, "ts") == [TSExample("9", "D", "S")]
    with pytest.raises(DataError, match="no split `train`"):
        load_hub("tc", str(tmp_path / "ag"), "train")


def test_cap_is_seeded_subset_in_order() -> None:
    exs = [TSExample(str(i), "d", "s") for i in range(50)]
    a = cap_examples(exs, 10, seed=3, task="ts")
    assert a == cap_examples(exs, 10, seed=3, task="ts")
    assert a != cap_examples(exs, 10, seed=4, task="ts")
    assert len(a) == 10 and [int(e.id) for e in a] == sorted(int(e.id) for e in a)
    assert cap_examples(exs, 0, seed=3, task="ts") == exs


def test_real_files_load(real_data: Path) -> None:
    tc = load_ag_news(real_data / "ag_news")
    rc = load_squad(real_data / "squad")
    ts = load_xsum(real_data / "xsum")
    assert (len(tc), len(rc), len(ts)) == (6581, 8807, 2410)
    assert tc[17].id == "agnews-test-17" and {e.label_name for e in tc} == {
        "World",
        "Sports",
        "Business",
        "Sci/Tech",
    }


def test_screen_drops_unusable_rows_and_counts_them(tmp_path: Path) -> None:
    from fedmoe.data.examples import RCExample, TSExample
    from fedmoe.data.loaders import screen

    ctx = "The cat sat on the mat."
    rows = [RCExample("a", "", ctx, "Who sat?", ("cat",), (4,)),  # span matches
            RCExample("b", "", ctx, "Who sat?", ("dog",), (4,)),  # text not in the context there
            RCExample("c", "", ctx, "Who sat?", ("cat",), (50,)),  # start past the context
            RCExample("d", "", ctx, " ", ("cat",), (4,))]  # empty question
    kept, dropped, why = screen(rows, "rc", "f.json")
    assert [r.id for r in kept] == ["a"] and dropped == 3 and "answer_start" in why
    ts = [TSExample("1", "doc", "sum"), TSExample("2", "  ", "sum"), TSExample("3", "doc", "")]
    kept, dropped, _ = screen(ts, "ts", "x.jsonl")
    assert [r.id for r in kept] == ["1"] and dropped == 2
    with pytest.raises(DataError, match="all 2 TS records are unusable"):
        screen(ts[1:], "ts", "x.jsonl")


def test_real_files_unusable_rows(real_data: Path) -> None:
    from fedmoe.data.loaders import load_local, screen

    assert screen(load_local(real_data, "rc"), "rc", "rc")[1] == 0  # every first answer is at its answer_start
    rows = load_local(real_data, "ts")
    kept, dropped, _ = screen(rows, "ts", "ts")  # the shared XSum test split has one empty document
    assert dropped == 1 and {r.id for r in rows} - {r.id for r in kept} == {"32556640"}


def test_hub_split_per_task_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.hub_split as a table picks each task's split; a task left out keeps its default; a plain
    string still applies to every task; unknown task names are one ConfigError."""
    from fedmoe.config import ConfigError, dump_toml, load_config
    from fedmoe.data.hub import hub_split_for

    write(tmp_path / "xs" / "train.jsonl", json.dumps({"id": "tr", "document": "D1", "summary": "S1"}) + "\n")
    write(tmp_path / "xs" / "test.jsonl", json.dumps({"id": "te", "document": "D2", "summary": "S2"}) + "\n")
    cfg = load_config(None, ["data.source=hub", f"data.hub_ts={tmp_path / 'xs'}", 'data.hub_split={ts = "train"}'])
    assert cfg.data.hub_split == {"ts": "train"}
    assert load_examples(cfg.data, "ts") == [TSExample("tr", "D1", "S1")]
    assert [hub_split_for(cfg.data.hub_split, t) for t in ("tc", "rc", "ts")] == ["test", "validation", "train"]
    plain = load_config(None, ["data.source=hub", f"data.hub_ts={tmp_path / 'xs'}", "data.hub_split=test"])
    assert load_examples(plain.data, "ts") == [TSExample("te", "D2", "S2")]
    assert [hub_split_for("dev", t) for t in ("tc", "rc", "ts")] == ["dev"] * 3
    # the resolved config round-trips through TOML with the table kept
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(cfg))
    assert load_config(again).data.hub_split == {"ts": "train"}
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['qa'\]"):
        load_config(None, ['data.hub_split={qa = "train"}'])
    with pytest.raises(ConfigError, match=r"data.hub_split` has an invalid value \{.ts.: 3\}"):
        load_config(None, ["data.hub_split={ts = 3}"])
