"""Table of bad inputs and faults through `fedmoe run` (in-process, as `fedmoe` itself calls it).

Each case ends with exit 0 and the expected output, or exit 2 / 1 with one line and no
traceback; every file that existed before the command is still there, byte for byte.
Most cases fail before a model loads; those that need a checkpoint share one tiny run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA

TINY = str(REPO / "configs" / "tiny.toml")
SMALL = ["data.max_examples_per_task=36", "setting.num_clients=6", "federation.clients_per_round=3",
         "train.max_local_steps=1", "engine.measure_memory=false", "fedmoe.stage1_rounds=1", "federation.rounds=0"]


def _sets(*items: str) -> list[str]:
    return [x for a in items for x in ("--set", a)]


def invoke(capsys, args: list[str]) -> tuple[int, str, str]:
    from fedmoe.cli import app

    with pytest.raises(SystemExit) as info:
        app(args, prog_name="fedmoe")
    cap = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else int(code)), cap.out, cap.err


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_dir() -> str:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return str(SHARED_DATA)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, data_dir) -> Path:
    """One finished 1-round run with a checkpoint (shared by the resume cases)."""
    from fedmoe.config import load_config
    from fedmoe.engine.run import run_experiment

    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_experiment(load_config(TINY, [*SMALL, f'data.data_dir="{data_dir}"']), out)
    return out


# -- case builders: (tmp, data_dir) -> args ------------------------------------------------------
def _cfg(*sets: str):
    return lambda tmp, data: ["run", TINY, *_sets(f'data.data_dir="{data}"', *sets), "--out", str(tmp / "out")]


def _file(name: str, content: bytes | str, *args: str):
    def build(tmp, data):
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["run", str(p), *args, "--out", str(tmp / "out")]
    return build


def _data(task: str, files: dict[str, str | bytes], *sets: str):
    def build(tmp, data):
        root = tmp / "data"
        for rel, content in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["run", TINY, *_sets(f'data.data_dir="{root}"', f'data.tasks=["{task}"]', *SMALL, *sets),
                "--out", str(tmp / "out")]
    return build


def _squad(answer: str, start: int) -> str:
    qas = [{"id": f"q{i}", "question": "Who sat?", "answers": [{"text": answer, "answer_start": start}]}
           for i in range(40)]
    return json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": qas}]}]})


def _out(kind: str):
    def build(tmp, data):
        out = tmp / "out"
        if kind == "file":
            out.write_text("my notes")
        elif kind == "user-config":
            out.mkdir()
            (out / "config.toml").write_text("# my own config\nseed = 1\n")
        elif kind == "old-run":
            out.mkdir()
            (out / "rounds.jsonl").write_text("{}\n")
            (out / "checkpoints").mkdir()
        elif kind == "under-file":
            (tmp / "afile").write_text("x")
            out = tmp / "afile" / "sub"
        extra = ["--overwrite"] if kind == "overwrite-foreign" else []
        if kind == "overwrite-foreign":
            out.mkdir()
            (out / "thesis.tex").write_text("years of work")
        return ["run", TINY, *_sets(f'data.data_dir="{data}"'), "--out", str(out), *extra]
    return build


def _resume(kind: str):
    def build(tmp, data):
        d = tmp / "r"
        if kind == "missing":
            return ["run", "--resume", str(d)]
        d.mkdir()
        if kind == "no-config":
            (d / "rounds.jsonl").write_text("")
            return ["run", "--resume", str(d)]
        (d / "config.toml").write_text(Path(TINY).read_text())
        if kind == "no-checkpoint":
            return ["run", "--resume", str(d)]
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "LATEST").write_text("../../../etc")
        return ["run", "--resume", str(d)]
    return build


NEEDS_CKPT = "ckpt"


def _ckpt(kind: str):
    """A copy of the shared checkpointed run, damaged as ``kind`` says."""
    def build(tmp, data, source: Path):
        d = tmp / "r"
        shutil.copytree(source, d)
        ck = d / "checkpoints" / (d / "checkpoints" / "LATEST").read_text().strip()
        man = json.loads((ck / "manifest.json").read_text())
        if kind == "truncated-manifest":
            (ck / "manifest.json").write_text((ck / "manifest.json").read_text()[:40])
        elif kind == "manifest-no-files":
            man.pop("files")
            (ck / "manifest.json").write_text(json.dumps(man))
        elif kind == "truncated-tensors":
            (ck / "trainable.safetensors").write_bytes((ck / "trainable.safetensors").read_bytes()[:100])
        elif kind == "garbage-state-resigned":
            (ck / "state.json").write_text('{"__t": "dc", "cls": "os:system", "f": {}}')
            man["files"]["state.json"] = hashlib.sha256((ck / "state.json").read_bytes()).hexdigest()
            (ck / "manifest.json").write_text(json.dumps(man))
        elif kind == "edited-config":
            cfg = (d / "config.toml").read_text()
            (d / "config.toml").write_text(cfg.replace("num_clients = 6", "num_clients = 8"))
        elif kind == "pickle-format":
            (ck / "state.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
            man.update(format=1, files={"state.pkl": hashlib.sha256((ck / "state.pkl").read_bytes()).hexdigest()})
            (ck / "manifest.json").write_text(json.dumps(man))
        return ["run", "--resume", str(d)]
    build.needs = NEEDS_CKPT  # type: ignore[attr-defined]
    return build


def _model(kind: str):
    def build(tmp, data):
        from fedmoe.moe.models import load_model

        m, _, _ = load_model("tiny-mixtral")
        d = tmp / "model"
        m.save_pretrained(d)
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000] if kind == "truncated" else b"\x00garbage" * 10)
        return ["run", TINY, *_sets(f'data.data_dir="{data}"', f'model.name="{d}"'), "--out", str(tmp / "out")]
    return build


CASES = [
    # config values
    ("unknown-key", _cfg("train.lrr=0.1"), 2, "did you mean `train.lr`"),
    ("wrong-type", _cfg("train.batch_size=many"), 2, "train.batch_size"),
    ("alpha-range", _cfg("fedmoe.alpha=1.5"), 2, "fedmoe.alpha"),
    ("bad-choice", _cfg("train.finetune=partial"), 2, "train.finetune"),
    ("lr-inf", _cfg("train.lr=inf"), 2, "train.lr"),
    ("lr-nan", _cfg("train.lr=nan"), 2, "train.lr"),
    ("checkpoint-every-neg", _cfg("engine.checkpoint_every=-1"), 2, "engine.checkpoint_every"),
    ("grad-clip-neg", _cfg("train.grad_clip=-1"), 2, "train.grad_clip"),
    ("warmup-5", _cfg("train.warmup_ratio=5"), 2, "train.warmup_ratio"),
    ("eval-batch-0", _cfg("train.eval_batch_size=0"), 2, "train.eval_batch_size"),
    ("target-len-0", _cfg("data.max_target_len=0"), 2, "data.max_target_len"),
    ("seed-neg", _cfg("seed=-1"), 2, "seed"),
    ("max-update-norm-neg", _cfg("engine.max_update_norm=-1"), 2, "engine.max_update_norm"),
    ("budgets-inverted", _cfg("setting.budget_low=0.9", "setting.budget_high=0.1"), 2, "budget_high"),
    ("fractions-sum", _cfg("data.val_fraction=0.5", "data.test_fraction=0.5"), 2, "val_fraction"),
    ("bad-fault-spec", _cfg('engine.inject_faults="x:y"'), 2, "engine.inject_faults"),
    ("unknown-algorithm", _cfg("algorithm=fedmo"), 2, "did you mean `fedmoe`"),
    ("override-no-equals", _cfg("train.lr"), 2, "has no `=`"),
    ("override-bad-toml", _cfg('model.name="unclosed'), 2, "not valid TOML"),
    ("hfedmoe-lam", _cfg("hfedmoe.lam=2"), 2, "hfedmoe.lam"),
    # config files
    ("missing-config", lambda tmp, data: ["run", str(tmp / "nope.toml"), "--out", str(tmp / "out")], 2,
     "does not exist"),
    ("no-config", lambda tmp, data: ["run", "--out", str(tmp / "out")], 2, "No config file given"),
    ("config-not-toml", _file("c.toml", "seed = = 1\n"), 2, "not valid TOML"),
    ("config-not-utf8", _file("c.toml", b"seed = 1\n\xff\xfe\n"), 2, "not valid TOML"),
    ("config-unknown-section", _file("c.toml", "[trian]\nlr = 1\n"), 2, "Unknown config key"),
    # output folder
    ("out-is-file", _out("file"), 2, "is a file"),
    ("out-has-user-config", _out("user-config"), 2, "is not empty"),
    ("out-is-old-run", _out("old-run"), 2, "--overwrite"),
    ("out-under-a-file", _out("under-file"), 2, "cannot be written"),
    ("overwrite-foreign-folder", _out("overwrite-foreign"), 2, "not a fedmoe run"),
    # resume
    ("resume-missing", _resume("missing"), 2, "not a run directory"),
    ("resume-no-config", _resume("no-config"), 2, "no config.toml"),
    ("resume-no-checkpoint", _resume("no-checkpoint"), 2, "no checkpoint"),
    ("resume-latest-escapes", _resume("latest"), 2, "not a checkpoint folder"),
    ("resume-flower", lambda tmp, data: [*_resume("no-checkpoint")(tmp, data), "--engine", "flower-sim"], 2,
     "in-process runs only"),
    ("ckpt-truncated-manifest", _ckpt("truncated-manifest"), 2, "not a fedmoe manifest"),
    ("ckpt-manifest-no-files", _ckpt("manifest-no-files"), 2, "not a fedmoe manifest"),
    ("ckpt-truncated-tensors", _ckpt("truncated-tensors"), 2, "missing or corrupt"),
    ("ckpt-crafted-state", _ckpt("garbage-state-resigned"), 2, "not allowed"),
    ("ckpt-pickle", _ckpt("pickle-format"), 2, "no pickle"),
    ("ckpt-edited-config", _ckpt("edited-config"), 2, "setting.num_clients: 6 → 8"),
    # model files
    ("model-truncated", _model("truncated"), 2, "Could not read the weights"),
    ("model-garbage", _model("garbage"), 2, "Could not read the weights"),
    ("model-unknown", _cfg("model.name=tiny-nope"), 2, "Unknown tiny model"),
    ("model-dir-no-config", lambda tmp, data: ["run", TINY, *_sets(f'data.data_dir="{data}"',
                                                                    f'model.name="{tmp}"'), "--out", str(tmp / "out")],
     2, "no config.json"),
    # data
    ("data-missing", _cfg('data.data_dir="/nonexistent/data"'), 2, "not found"),
    ("squad-not-json", _data("rc", {"squad/dev.json": "{not json"}), 2, "squad"),
    ("squad-spans-outside", _data("rc", {"squad/dev.json": _squad("dog", 4)}), 2, "all 40 RC records are unusable"),
    ("xsum-all-empty", _data("ts", {"xsum/test.jsonl": "".join(
        json.dumps({"id": str(i), "document": " ", "summary": "s"}) + "\n" for i in range(40))}), 2,
     "all 40 TS records are unusable"),
    ("xsum-bad-line", _data("ts", {"xsum/test.jsonl": "{oops\n"}), 2, "not valid JSON"),
    ("unknown-task", _cfg('data.tasks=["qa"]'), 2, "qa"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capsys, data_dir, request):
    name, build, want, fragment = case
    if getattr(build, "needs", None) == NEEDS_CKPT:
        args = build(tmp_path, data_dir, request.getfixturevalue("checkpointed"))
    else:
        args = build(tmp_path, data_dir)
    capsys.readouterr()  # what building the case printed
    before = _snapshot(tmp_path)
    out_existed = (tmp_path / "out").exists()
    code, _, err = invoke(capsys, args)
    assert code == want, (name, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment.lower() in err.lower(), err
    assert err.startswith("error:") and "Fix:" in err, err
    after = _snapshot(tmp_path)
    lost = {k for k, v in before.items() if after.get(k) != v}
    assert not lost, lost
    if not out_existed:
        assert not (tmp_path / "out").exists()  # a failed fresh run leaves no output folder


def test_internal_error_is_one_line_and_debug_shows_the_traceback_without_locals(tmp_path, capsys, data_dir,
                                                                                   monkeypatch):
    import fedmoe.engine.run as run_mod

    def boom(*a, **k):
        secret = "hun" + "ter2"  # noqa: F841 — a local that must never be printed
        raise RuntimeError("boom")

    monkeypatch.setattr(run_mod, "run_experiment", boom)
    args = ["run", TINY, *_sets(f'data.data_dir="{data_dir}"'), "--out", str(tmp_path / "o")]
    code, _, err = invoke(capsys, args)
    assert code == 1 and err.startswith("internal error: RuntimeError: boom") and "--debug" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    code, _, err = invoke(capsys, ["--debug", *args])
    assert code == 1 and "Traceback" in err and "boom" in err and "hunter2" not in err


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path, capsys, data_dir, monkeypatch):
    import fedmoe.engine.checkpoint as ck

    real = ck._fsync_write

    def full(path, data):
        if path.name == "state.json" and "round-00001" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(ck, "_fsync_write", full)
    out = tmp_path / "o"
    sets = [*SMALL[:-1], "federation.rounds=1", f'data.data_dir="{data_dir}"']
    code, _, err = invoke(capsys, ["run", TINY, *_sets(*sets), "--out", str(out)])
    assert code == 2 and err.startswith("error: No space left on device") and "--resume" in err, err
    assert len(err.strip().splitlines()) == 1
    assert (out / "INCOMPLETE").is_file() and (out / "checkpoints" / "LATEST").read_text() == "round-00000"
    monkeypatch.setattr(ck, "_fsync_write", real)
    code, _, err = invoke(capsys, ["run", "--resume", str(out)])
    assert code == 0, err
    rounds = len((out / "rounds.jsonl").read_text().splitlines())
    assert not (out / "INCOMPLETE").exists() and json.loads((out / "summary.json").read_text())["rounds"] == rounds >= 2


def test_injected_reply_faults_through_the_cli_are_rejected_and_the_run_finishes(tmp_path, capsys, data_dir):
    out = tmp_path / "o"
    sets = [*SMALL, f'data.data_dir="{data_dir}"', 'engine.inject_faults="0:0:bad_p,0:1:big_update"',
            "engine.max_update_norm=100", "federation.clients_per_round=6"]
    code, _, err = invoke(capsys, ["run", TINY, *_sets(*sets), "--out", str(out)])
    assert code == 0, err
    clients = {c["client_id"]: c for c in json.loads((out / "rounds.jsonl").read_text().splitlines()[0])["clients"]}
    sampled = set(clients)
    if 0 in sampled:
        assert "not probabilities" in clients[0]["error"]
    if 1 in sampled:
        assert "exceeds engine.max_update_norm" in clients[1]["error"]
    assert all(not c["error"] for cid, c in clients.items() if cid > 1)
    assert (out / "summary.json").is_file()


def test_out_same_run_needs_overwrite_and_then_starts_clean(tmp_path, capsys, checkpointed, data_dir):
    out = tmp_path / "r"
    shutil.copytree(checkpointed, out)
    (out / "checkpoints" / "round-00099").mkdir()  # an older run's later checkpoint
    args = ["run", str(out / "config.toml"), "--out", str(out)]
    code, _, err = invoke(capsys, args)
    assert code == 2 and "--overwrite" in err
    code, _, err = invoke(capsys, [*args, "--overwrite"])
    assert code == 0, err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    last = f"round-{json.loads((out / 'summary.json').read_text())['rounds'] - 1:05d}"
    assert "round-00099" not in ckpts and ckpts[0] == "LATEST" and max(ckpts[1:]) == last  # only this run's own
    assert (out / "checkpoints" / "LATEST").read_text() == last
