"""The study runner: its checks without executing the study, and side-by-side execution of two tiny
notebooks."""

import json
import time
from pathlib import Path

import pytest

from cmbfe import config, study
from cmbfe.config import ConfigError
from cmbfe.study import reproduce, runs


def test_every_notebook_has_a_parameters_cell_with_profile_and_no_outputs():
    nbs = reproduce.notebooks()
    assert [p.stem[:2] for p in nbs] == [f"{i:02d}" for i in range(1, len(nbs) + 1)]
    for p in nbs:
        names = reproduce.parameter_names(p)
        assert "profile" in names, p
        nb = json.loads(p.read_text())
        assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), p


@pytest.mark.parametrize("path", sorted(config.PARAMS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_profile_keys_match_parameter_cells(path):
    cfg = config.load(path)  # every params file, named profile or not
    assert cfg.profile == path.stem
    reproduce.check_profile(cfg)  # raises on a misspelled key


@pytest.mark.parametrize("profile", ["default", "extended", "paper", "extended-seed0"])
def test_train_runs_listed_in_profile_match_the_main_grid(profile):
    cfg = config.load(profile if profile in config.PROFILES else config.PARAMS_DIR / f"{profile}.yaml")
    listed = cfg.notebooks.get("03_train", [])
    listed = listed if isinstance(listed, list) else [listed]
    assert sorted(map(json.dumps, listed)) == sorted(map(json.dumps, study.main_grid(cfg)))


def test_misspelled_notebook_key_is_an_error():
    cfg = config.load("smoke", ["notebooks={'01_data': {'profil': 'x'}}"])
    with pytest.raises(ConfigError, match=r"notebooks.01_data sets \['profil'\]"):
        reproduce.check_profile(cfg)
    cfg = config.load("smoke", ["notebooks={'99_nope': {}}"])
    with pytest.raises(ConfigError, match="no notebook 99_nope"):
        reproduce.check_profile(cfg)


def test_parameter_names_parses_without_executing(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]},
                     "source": ["profile = 'smoke'\n", "size: int | None = None\n",
                                "import os; os._exit(3)\n"]}]}
    p = tmp_path / "01_x.ipynb"
    p.write_text(json.dumps(nb))
    assert reproduce.parameter_names(p) == {"profile", "size"}
    nb["cells"][0]["metadata"]["tags"] = []
    p.write_text(json.dumps(nb))
    with pytest.raises(ConfigError, match="no cell tagged 'parameters'"):
        reproduce.parameter_names(p)


def test_results_and_figures_of_non_default_profiles_are_separate():
    smoke, default = config.load("smoke"), config.load("default")
    assert smoke.results_path().name == "smoke"
    assert default.results_path() == config.REPO_ROOT / "results"
    assert smoke.figures_path().parent == config.REPO_ROOT / "figures"
    assert default.figures_path() == config.REPO_ROOT / "figures"
    assert smoke.runs_path() == config.REPO_ROOT / "runs" / "smoke"
    assert smoke.pre_path() == smoke.data_path() / "pre" and smoke.raw_path() == smoke.data_path() / "raw"


def test_run_keys_separate_configurations():
    cfg = config.load("smoke")
    a = study.grid_config(cfg, fe=False, seed=0)
    b = study.grid_config(cfg, fe=True, seed=0)
    assert study.run_key(a) != study.run_key(b)
    assert study.run_tag(b).endswith("fe-pre_l2norm-constant-s0")
    assert study.data_key(a) == study.data_key(b)
    assert study.run_key(study.with_overrides(a, {"train.log_every": 1})) == study.run_key(a)


def _tiny_notebook(path, body: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def test_side_by_side_executions_get_their_threads_and_report_the_failing_cell(tmp_path):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from cmbfe.study.reproduce import _execute

    ok, bad = tmp_path / "ok.ipynb", tmp_path / "bad.ipynb"
    _tiny_notebook(ok, "import os\nimport torch\n"
                       "assert os.environ['CMBFE_THREADS'] == '1', os.environ.get('CMBFE_THREADS')\n"
                       "assert torch.get_num_threads() == 1, torch.get_num_threads()  # OMP pool too\ny = x")
    _tiny_notebook(bad, "raise ValueError('boom at ' + str(x))")
    jobs = [(str(ok), str(tmp_path / "ok.out.ipynb"), {"x": 2}, 1),
            (str(bad), str(tmp_path / "bad.out.ipynb"), {"x": 5}, 1)]
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        r_ok, r_bad = pool.map(_execute, jobs)
    assert r_ok["error"] is None and r_ok["seconds"] > 0
    assert r_bad["error"] is not None and "cell 2" in r_bad["error"] and "boom at 5" in r_bad["error"]
    assert (tmp_path / "bad.out.ipynb").exists()  # the executed copy with the traceback is kept


def test_stage_groups_keep_order_and_join_only_independent_notebooks():
    from cmbfe.study.reproduce import stage_groups

    nb = {n: Path(f"notebooks/{n}.ipynb") for n in
          ("01_data", "03_train", "05_evaluate", "06_cross_validation", "07_backbone_timing", "08_ablations")}
    jobs = [(nb["01_data"], "a"), (nb["03_train"], "t1"), (nb["03_train"], "t2"), (nb["05_evaluate"], "e"),
            (nb["06_cross_validation"], "cv"), (nb["07_backbone_timing"], "t3"), (nb["08_ablations"], "ab")]
    assert [[j[1] for j in g] for g in stage_groups(jobs)] == [["a"], ["t1", "t2"], ["e"], ["cv", "t3", "ab"]]
    # 05 between two stage members splits them: order is never changed
    jobs = [(nb["06_cross_validation"], "cv"), (nb["05_evaluate"], "e"), (nb["08_ablations"], "ab")]
    assert [[j[1] for j in g] for g in stage_groups(jobs)] == [["cv"], ["e"], ["ab"]]
    assert stage_groups([]) == []


def _hold(lock: str, log: str, tag: str) -> None:
    with runs._locked(Path(lock)), open(log, "a") as fh:
        fh.write(f"{tag}+")
        fh.flush()
        time.sleep(0.3)
        fh.write(f"{tag}-")


def test_run_lock_serialises_processes(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    lock, log = str(tmp_path / "sub" / ".run.lock"), str(tmp_path / "log")
    ps = [ctx.Process(target=_hold, args=(lock, log, t)) for t in "ab"]
    for p in ps:
        p.start()
    for p in ps:
        p.join(10)
    assert all(p.exitcode == 0 for p in ps)
    text = Path(log).read_text()
    assert text in ("a+a-b+b-", "b+b-a+a-"), text  # never interleaved
