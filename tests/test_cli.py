"""The ``cmbfe`` dispatcher: help, unknown commands, and every config or input error as one line, exit 2."""

from __future__ import annotations

import pytest

from cmbfe import cli


def test_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "preprocess" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, key",
    [("model.size=64", "model.size"), ("fe.placement=middle", "fe.placement"), ("train.lr=0", "train.lr"),
     ("train.lr=-1", "train.lr")],
)
def test_bad_config_value_is_one_line_and_exit_2(override, key, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--params", "smoke", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cmbfe train: error: ") and key in err, err
    assert "Traceback" not in err and not out.exists()


def test_input_error_is_one_line(tmp_path, capsys):
    args = ["evaluate", "--gt", str(tmp_path / "none.json"), "--dets", str(tmp_path / "d.json"),
            "--out", str(tmp_path / "m.json")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.json: file not found" in err
